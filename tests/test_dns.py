"""DNS primitives against the loopback DNS server (and a patched getaddrinfo)."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

import hostile_servers
import servers
from probes import dns, failures
from probes.records import Clock

pytestmark = pytest.mark.timeout(20)


async def lookup(server: servers.DNSServer, name: str, qtype: str = "A", **kw):
    kw.setdefault("timeout", 1.0)
    kw.setdefault("linger", 0.3)
    return await dns.udp_lookup(name, server.address, qtype, clock=Clock(), txid=7, **kw)


async def test_udp_answer(dns_server):
    dns_server.program("site.test", answer=["192.0.2.1", "192.0.2.2", "2001:db8::1"])
    [entry] = await lookup(dns_server, "site.test")
    assert entry["failure"] is None
    assert entry["rcode"] == "NOERROR"
    assert entry["engine"] == "udp"
    assert entry["resolver_address"] == dns_server.address
    assert entry["transaction_id"] == 7 and entry["x_response_index"] == 0
    assert sorted(a["ipv4"] for a in entry["answers"]) == ["192.0.2.1", "192.0.2.2"]  # an RRset has no order
    assert entry["answers"][0]["ttl"] == 60
    assert entry["t"] >= entry["t0"]


async def test_udp_aaaa(dns_server):
    dns_server.program("site.test", answer=["192.0.2.1", "2001:db8::1"])
    [entry] = await lookup(dns_server, "site.test", "AAAA")
    assert entry["query_type"] == "AAAA"
    assert entry["answers"] == [{"answer_type": "AAAA", "ipv6": "2001:db8::1", "ttl": 60}]


async def test_udp_cname_kept(dns_server):
    dns_server.program("alias.test", answer=["192.0.2.9"], cname="target.test")
    [entry] = await lookup(dns_server, "alias.test")
    assert entry["failure"] is None
    assert entry["answers"][0] == {"answer_type": "CNAME", "hostname": "target.test", "ttl": 60}
    assert entry["answers"][1]["ipv4"] == "192.0.2.9"


@pytest.mark.parametrize(
    ("rcode", "failure"),
    [("NXDOMAIN", failures.DNS_NXDOMAIN), ("REFUSED", failures.DNS_REFUSED), ("SERVFAIL", failures.DNS_SERVFAIL)],
)
async def test_udp_rcodes(dns_server, rcode, failure):
    dns_server.program("x.test", rcode=rcode)
    [entry] = await lookup(dns_server, "x.test")
    assert entry["failure"] == failure
    assert entry["rcode"] == rcode
    assert entry["answers"] == []


async def test_udp_no_answer(dns_server):
    dns_server.program("v4only.test", answer=["192.0.2.1"])
    [entry] = await lookup(dns_server, "v4only.test", "AAAA")
    assert entry["failure"] == failures.DNS_NO_ANSWER
    assert entry["rcode"] == "NOERROR"


async def test_udp_cname_without_address_is_no_answer(dns_server):
    dns_server.program("dangling.test", answer=[], cname="nowhere.test")
    [entry] = await lookup(dns_server, "dangling.test")
    assert entry["failure"] == failures.DNS_NO_ANSWER
    assert entry["answers"][0]["answer_type"] == "CNAME"


async def test_udp_silent_times_out(dns_server):
    dns_server.program("quiet.test", silent=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    [entry] = await lookup(dns_server, "quiet.test", timeout=0.5)
    assert entry["failure"] == failures.GENERIC_TIMEOUT
    assert entry["rcode"] is None and entry["answers"] == []
    assert 0.45 <= loop.time() - start < 2.0
    assert dns_server.received == [("quiet.test", "A")]  # sent exactly once


async def test_udp_injection_keeps_every_response(dns_server):
    dns_server.program("blocked.test", answer=["192.0.2.80"], inject=["10.10.34.35"], inject_delay=0.2)
    entries = await lookup(dns_server, "blocked.test", linger=1.0)
    assert [e["x_response_index"] for e in entries] == [0, 1]
    assert entries[0]["answers"][0]["ipv4"] == "10.10.34.35"
    assert entries[1]["answers"][0]["ipv4"] == "192.0.2.80"
    assert {e["transaction_id"] for e in entries} == {7}
    assert entries[1]["t"] - entries[0]["t"] >= 0.15
    assert dns.first_addresses(entries) == ["10.10.34.35"]


async def test_udp_linger_bounds_waiting(dns_server):
    # The genuine reply comes after the linger window: only the forged one is seen,
    # and the lookup ends long before the timeout.
    dns_server.program("blocked.test", answer=["192.0.2.80"], inject=["10.10.34.35"], inject_delay=0.6)
    loop = asyncio.get_running_loop()
    start = loop.time()
    entries = await lookup(dns_server, "blocked.test", linger=0.2, timeout=5.0)
    assert len(entries) == 1
    assert loop.time() - start < 1.0


async def test_udp_closed_port():
    # ICMP port unreachable on loopback: the resolver does not exist.
    port = servers.closed_port()
    [entry] = await dns.udp_lookup("x.test", f"127.0.0.1:{port}", clock=Clock(), txid=1, timeout=1.0)
    assert entry["failure"] == failures.CONNECTION_REFUSED


def test_parse_server():
    assert dns.parse_server("192.0.2.1") == ("192.0.2.1", 53)
    assert dns.parse_server("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert dns.parse_server("2001:db8::1") == ("2001:db8::1", 53)
    assert dns.parse_server("[2001:db8::1]:853") == ("2001:db8::1", 853)


async def test_system_lookup_localhost():
    entry = await dns.system_lookup("localhost", clock=Clock(), txid=3, timeout=2.0)
    assert entry["failure"] is None
    assert entry["engine"] == "system"
    assert "127.0.0.1" in dns.first_addresses([entry])


@pytest.mark.parametrize(
    ("code", "failure"),
    [(socket.EAI_NONAME, failures.DNS_NXDOMAIN), (socket.EAI_AGAIN, failures.DNS_TEMPORARY)],
)
async def test_system_lookup_failures(monkeypatch, code, failure):
    def fake(*args, **kwargs):
        raise socket.gaierror(code, "patched")

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    entry = await dns.system_lookup("blocked.test", clock=Clock(), txid=3, timeout=2.0)
    assert entry["failure"] == failure
    assert entry["answers"] == []


async def test_system_lookup_both_families(monkeypatch):
    def fake(host, port, family=0, type=0, proto=0, flags=0):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    entry = await dns.system_lookup("site.test", clock=Clock(), txid=3, timeout=2.0)
    assert entry["answers"] == [
        {"answer_type": "A", "ipv4": "192.0.2.1", "ttl": None},
        {"answer_type": "AAAA", "ipv6": "2001:db8::1", "ttl": None},
    ]


async def test_system_lookup_timeout(monkeypatch):
    import time

    def slow(*args, **kwargs):
        time.sleep(0.5)
        raise socket.gaierror(socket.EAI_AGAIN, "late")

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    entry = await dns.system_lookup("slow.test", clock=Clock(), txid=3, timeout=0.1)
    assert entry["failure"] == failures.GENERIC_TIMEOUT


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_doh(pki, method):
    responder = servers.DNSResponder()
    responder.program("site.test", answer=["192.0.2.7"])
    responder.program("gone.test", rcode="NXDOMAIN")
    async with servers.WebServer(pki.server_context(pki.good), responder) as web:
        connector = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(connector=connector) as session:
            url = web.url("/dns-query", host="localhost")
            ok = await dns.doh_lookup("site.test", url, session=session, clock=Clock(), txid=2, timeout=3, method=method)
            nx = await dns.doh_lookup("gone.test", url, session=session, clock=Clock(), txid=3, timeout=3, method=method)
    assert ok["failure"] is None and ok["engine"] == "doh" and ok["resolver_address"] == url
    assert dns.first_addresses([ok]) == ["192.0.2.7"]
    assert nx["failure"] == failures.DNS_NXDOMAIN


async def test_doh_http_error_and_timeout(http_server):
    http_server.dns.program("quiet.test", silent=True)
    async with aiohttp.ClientSession() as session:
        bad = await dns.doh_lookup("x.test", http_server.url("/status/500"), session=session, clock=Clock(), txid=1, timeout=2)
        slow = await dns.doh_lookup("quiet.test", http_server.url("/dns-query"), session=session, clock=Clock(), txid=1, timeout=0.3)
    assert bad["failure"] == failures.HTTP_REQUEST_FAILED
    assert slow["failure"] == failures.GENERIC_TIMEOUT


async def test_doh_refused():
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{servers.closed_port()}/dns-query"
        entry = await dns.doh_lookup("x.test", url, session=session, clock=Clock(), txid=1, timeout=2)
    assert entry["failure"] == failures.CONNECTION_REFUSED


def test_first_addresses_skips_late_and_dupes():
    queries = [
        {"x_response_index": 0, "answers": [{"answer_type": "CNAME", "hostname": "a"}, {"answer_type": "A", "ipv4": "192.0.2.1"}]},
        {"x_response_index": 1, "answers": [{"answer_type": "A", "ipv4": "192.0.2.66"}]},
        {"x_response_index": 0, "answers": [{"answer_type": "A", "ipv4": "192.0.2.1"}, {"answer_type": "AAAA", "ipv6": "2001:db8::2"}]},
    ]
    assert dns.first_addresses(queries) == ["192.0.2.1", "2001:db8::2"]


# --- issue 10: truncated replies, floods, garbage, a hung system resolver -----------------


async def test_udp_truncated_reply_is_retried_over_tcp(dns_server):
    # A TC reply used to end the lookup with no address (musl's resolver, and
    # ours, then said the network was down). Resolvers retry over TCP.
    dns_server.program("big.test", answer=["192.0.2.5", "192.0.2.6"], truncate=True)
    entries = await lookup(dns_server, "big.test")
    assert [e["engine"] for e in entries] == ["udp", "tcp"]
    udp, tcp = entries
    assert udp["x_truncated"] is True and udp["answers"] == []
    assert tcp["failure"] is None and tcp["resolver_address"] == dns_server.address
    assert sorted(a["ipv4"] for a in tcp["answers"]) == ["192.0.2.5", "192.0.2.6"]
    assert {e["transaction_id"] for e in entries} == {7}
    assert tcp["t0"] >= udp["t"] - 0.001
    assert dns_server.tcp_queries == 1
    assert sorted(dns.first_addresses(entries)) == ["192.0.2.5", "192.0.2.6"]


async def test_truncated_reply_cut_mid_record_is_retried_over_tcp():
    async with hostile_servers.HostileDNS("tc-cut", answer="192.0.2.9") as server:
        entries = await dns.udp_lookup("x.test", server.address, clock=Clock(), txid=1, timeout=2.0, linger=0.2)
    assert [e["engine"] for e in entries] == ["udp", "tcp"]
    assert dns.first_addresses(entries) == ["192.0.2.9"]


async def test_truncated_reply_and_no_tcp_records_the_failed_retry(dns_server):
    dns_server.program("big.test", answer=["192.0.2.5"], truncate=True)
    dns_server.tcp_server.close()
    await dns_server.tcp_server.wait_closed()
    loop = asyncio.get_running_loop()
    start = loop.time()
    entries = await lookup(dns_server, "big.test", timeout=1.0)
    assert loop.time() - start < 2.0
    assert [e["engine"] for e in entries] == ["udp", "tcp"]
    assert entries[1]["failure"] == failures.CONNECTION_REFUSED


async def test_reply_flood_is_bounded():
    async with hostile_servers.HostileDNS("flood", answer="192.0.2.9") as server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        entries = await dns.udp_lookup("x.test", server.address, clock=Clock(), txid=1, timeout=2.0, linger=1.0)
    assert loop.time() - start < 1.5
    assert len(entries) == dns.MAX_RESPONSES
    assert [e["x_response_index"] for e in entries] == list(range(dns.MAX_RESPONSES))


async def test_reply_with_thousands_of_records_is_capped():
    async with hostile_servers.HostileDNS("big", answer="192.0.2.9") as server:
        [entry] = await dns.udp_lookup("x.test", server.address, clock=Clock(), txid=1, timeout=2.0, linger=0.2)
    assert len(entry["answers"]) == dns.MAX_ANSWERS


async def test_garbage_replies_are_ignored():
    async with hostile_servers.HostileDNS("garbage", answer="192.0.2.9") as server:
        entries = await dns.udp_lookup("x.test", server.address, clock=Clock(), txid=1, timeout=2.0, linger=0.3)
    assert [dns.first_addresses([e]) for e in entries] == [["192.0.2.9"]]


CTRL_C_WHILE_RESOLVING = r"""
import asyncio, os, signal, socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
# As in a terminal: a shell starts background jobs with SIGINT ignored, and
# this test may run under one (CI started with `&`): that is not the probe's.
signal.signal(signal.SIGINT, signal.default_int_handler)
_real = socket.getaddrinfo
def hung(host, *args, **kwargs):  # a resolver that never answers, as glibc sees it
    if host == "hang.test":
        time.sleep(30)
    return _real(host, *args, **kwargs)
socket.getaddrinfo = hung
from concurrent.futures import ThreadPoolExecutor
from probes import dns
from probes.records import Clock
async def main():
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=8))  # as the runner does
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    await dns.system_lookup("hang.test", clock=Clock(), txid=1, timeout=60)
try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_while_the_system_resolver_hangs_is_prompt():
    import subprocess
    import sys
    import time
    from pathlib import Path

    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_RESOLVING, str(Path(__file__).resolve().parent.parent)],
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.stdout.strip() == "interrupted", proc.stderr
    assert elapsed < 5.0  # was 30 s: asyncio.run and exit waited for the resolver thread
