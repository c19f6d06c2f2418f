"""HTTP fetch primitive against the loopback web servers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import tracemalloc

import pytest

import hostile_servers
import servers
from yarl import URL
from core.net import Policy
from probes import failures, http, tls
from probes.records import Clock, Transactions, body_bytes
from probes.timeouts import Timeouts

pytestmark = pytest.mark.timeout(30)

FAST = Timeouts(connect=1.0, http=3.0)


@pytest.fixture
async def endless_server():
    async with hostile_servers.HostileHTTP() as server:
        yield server


async def get(url, *, timeouts=FAST, events=None, **kw):
    return await http.fetch(url, clock=Clock(), transactions=Transactions(), timeouts=timeouts,
                            events=[] if events is None else events, **kw)


async def test_page(http_server):
    events = []
    [entry] = await get(http_server.url("/"), events=events)
    assert entry["failure"] is None
    assert entry["response"]["code"] == 200
    assert entry["response"]["body"] == servers.PAGE.decode()
    assert entry["response"]["body_is_truncated"] is False
    assert entry["response"]["headers"]["Content-Type"].startswith("text/html")
    assert entry["x_title"] == servers.TITLE
    assert entry["x_body_length"] == len(servers.PAGE)
    assert entry["x_body_sha256"] == hashlib.sha256(servers.PAGE).hexdigest()
    assert entry["x_address"] == f"127.0.0.1:{http_server.port}"
    assert entry["x_redirect_index"] == 0 and entry["transaction_id"] == 1
    assert entry["request"]["method"] == "GET"
    assert entry["request"]["headers"]["User-Agent"].startswith("Mozilla/5.0")
    assert events and all(e["operation"] == "bytes_received" for e in events)
    assert sum(e["num_bytes"] for e in events) == len(servers.PAGE)
    assert all(e["transaction_id"] == 1 and e["address"] == entry["x_address"] for e in events)


@pytest.mark.parametrize("path", ["/gzip", "/deflate"])
async def test_decompressed(http_server, path):
    [entry] = await get(http_server.url(path))
    assert entry["response"]["headers"]["Content-Encoding"] in ("gzip", "deflate")
    assert entry["response"]["body"] == servers.PAGE.decode()
    assert entry["x_title"] == servers.TITLE


async def test_pinned_name_goes_to_measured_address(http_server, monkeypatch):
    # The name would not resolve (getaddrinfo is made to fail): the pin is what is used.
    def broken(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "patched")

    monkeypatch.setattr(socket, "getaddrinfo", broken)
    [entry] = await get(f"http://www.site.test:{http_server.port}/", pinned={"www.site.test": "127.0.0.1"})
    assert entry["failure"] is None
    assert entry["x_address"] == f"127.0.0.1:{http_server.port}"


async def test_unpinned_name_resolves_normally(http_server):
    [entry] = await get(http_server.url("/", host="localhost"), pinned={"other.test": "192.0.2.1"})
    assert entry["failure"] is None and entry["x_address"] == f"127.0.0.1:{http_server.port}"


async def test_dns_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "patched")

    monkeypatch.setattr(socket, "getaddrinfo", broken)
    [entry] = await get("http://blocked.test/")
    assert entry["failure"] == failures.DNS_NXDOMAIN
    assert entry["response"] == {} and entry["x_address"] is None


async def test_redirect_hops(http_server):
    entries = await get(http_server.url("/chain/2"))
    assert [e["x_redirect_index"] for e in entries] == [0, 1, 2]
    assert [e["response"]["code"] for e in entries] == [302, 302, 200]
    assert [e["request"]["url"] for e in entries] == [
        http_server.url("/chain/2"), http_server.url("/chain/1"), http_server.url("/"),
    ]
    assert [e["transaction_id"] for e in entries] == [1, 2, 3]
    assert entries[-1]["x_title"] == servers.TITLE
    assert all(e["failure"] is None for e in entries)


async def test_redirect_loop(http_server):
    entries = await get(http_server.url("/loop"))
    assert len(entries) == 11  # the first request and ten redirects followed
    assert entries[-1]["failure"] == failures.HTTP_TOO_MANY_REDIRECTS
    assert all(e["failure"] is None for e in entries[:-1])
    assert http_server.hits["/loop"] == 11


async def test_max_redirects_exact(http_server):
    entries = await get(http_server.url("/chain/3"), max_redirects=3)
    assert entries[-1]["failure"] is None and entries[-1]["response"]["code"] == 200
    entries = await get(http_server.url("/chain/3"), max_redirects=2)
    assert len(entries) == 3 and entries[-1]["failure"] == failures.HTTP_TOO_MANY_REDIRECTS


async def test_invalid_redirect(http_server):
    [entry] = await get(http_server.url("/bad-redirect"))
    assert entry["failure"] == failures.HTTP_INVALID_REDIRECT
    assert entry["response"]["code"] == 302


async def test_large_body_truncated(http_server):
    [entry] = await get(http_server.url("/large"))
    assert entry["failure"] is None
    assert entry["response"]["body_is_truncated"] is True
    assert entry["x_body_length"] == http.MAX_BODY
    assert len(body_bytes(entry["response"]["body"])) == http.MAX_BODY


async def test_body_exactly_at_cap_not_truncated(http_server):
    [entry] = await get(http_server.url("/"), max_body=len(servers.PAGE))
    assert entry["response"]["body_is_truncated"] is False
    [entry] = await get(http_server.url("/"), max_body=len(servers.PAGE) - 1)
    assert entry["response"]["body_is_truncated"] is True


async def test_gzip_bomb_capped(http_server):
    servers.gzip_bomb()  # build the server's payload before measuring our own memory
    tracemalloc.start()
    try:
        [entry] = await get(http_server.url("/bomb"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry["failure"] is None
    assert entry["response"]["body_is_truncated"] is True
    assert entry["x_body_length"] == http.MAX_BODY
    assert body_bytes(entry["response"]["body"]) == bytes(http.MAX_BODY)
    # Decompression never held more than a few caps' worth, nowhere near 50 MB.
    assert peak < 8 * 1024 * 1024


async def test_trickle_hits_total_deadline(http_server):
    events = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    [entry] = await get(http_server.url("/trickle"), timeouts=Timeouts(connect=1.0, http=0.6), events=events)
    assert entry["failure"] == failures.GENERIC_TIMEOUT
    assert loop.time() - start < 2.0
    assert entry["response"]["code"] == 200
    assert entry["x_body_length"] >= 3 and set(entry["response"]["body"]) == {"x"}
    assert len(events) >= 3
    times = [e["t"] for e in events]
    assert times == sorted(times)


async def test_connection_refused():
    [entry] = await get(f"http://127.0.0.1:{servers.closed_port()}/")
    assert entry["failure"] == failures.CONNECTION_REFUSED
    assert entry["response"] == {} and entry["x_body_length"] is None


async def test_connect_timeout():
    with servers.Blackhole() as port:
        [entry] = await get(f"http://127.0.0.1:{port}/", timeouts=Timeouts(connect=0.3, http=3.0))
    assert entry["failure"] == failures.GENERIC_TIMEOUT


async def test_reset_before_response(http_server):
    [entry] = await get(http_server.url("/reset"))
    assert entry["failure"] == failures.CONNECTION_RESET


async def test_server_closes_without_response(eof_server):
    [entry] = await get(f"http://127.0.0.1:{eof_server.port}/")
    assert entry["failure"] == failures.EOF_ERROR


async def test_silent_server_times_out(silent_server):
    [entry] = await get(f"http://127.0.0.1:{silent_server.port}/", timeouts=Timeouts(connect=1.0, http=0.4))
    assert entry["failure"] == failures.GENERIC_TIMEOUT


async def test_https_with_extra_ca(https_server, pki):
    [entry] = await get(https_server.url("/", host="localhost"), context=tls.make_context(pki.ca_file))
    assert entry["failure"] is None and entry["x_title"] == servers.TITLE


async def test_https_pinned(https_server, pki):
    url = f"https://localhost:{https_server.port}/redirect"
    entries = await get(url, context=tls.make_context(pki.ca_file), pinned={"localhost": "127.0.0.1"})
    assert [e["response"]["code"] for e in entries] == [302, 200]
    assert all(e["x_address"] == f"127.0.0.1:{https_server.port}" for e in entries)


async def test_https_unknown_authority_without_extra_ca(https_server):
    [entry] = await get(https_server.url("/", host="localhost"), context=tls.make_context())
    assert entry["failure"] == failures.SSL_UNKNOWN_AUTHORITY


async def test_https_certificate_failures(bad_cert_case, pki):
    server, _leaf, failure = bad_cert_case
    [entry] = await get(f"https://localhost:{server.port}/", context=tls.make_context(pki.ca_file))
    assert entry["failure"] == failure
    assert entry["response"] == {}


async def test_https_reset_after_client_hello(rst_server, pki):
    [entry] = await get(f"https://localhost:{rst_server.port}/", context=tls.make_context(pki.ca_file))
    assert entry["failure"] == failures.CONNECTION_RESET


def test_extract_title():
    assert http.extract_title(b"<html><TITLE lang=en>\n A &amp; B\n</title>") == "A & B"
    assert http.extract_title(b"<title>caf\xe9</title>", "text/html; charset=iso-8859-1") == "caf\u00e9"
    assert http.extract_title(b"no title here") is None


@pytest.mark.parametrize(("path", "failure"), [("/cut", failures.EOF_ERROR), ("/cut-reset", failures.CONNECTION_RESET)])
async def test_body_cut_short_keeps_bytes(http_server, path, failure):
    events = []
    [entry] = await get(http_server.url(path), events=events)
    assert entry["failure"] == failure
    assert entry["response"]["code"] == 200
    assert entry["response"]["body"] == "y" * 100
    assert sum(e["num_bytes"] for e in events) == 100


# --- issue 10: redirects into the volunteer's network, records bounded in bytes ---------


@pytest.fixture
async def other_host():
    """A second machine: a site on 127.0.0.2 (not the input's address)."""
    async with servers.WebServer(host="127.0.0.2") as server:
        yield server


def _to(server, location: str) -> str:
    from urllib.parse import quote

    return server.url("/redirect-to?location=" + quote(location, safe=""))


@pytest.mark.parametrize("target", [
    "http://127.0.0.2:{port}/",             # loopback, another address than the input's
    "http://0x7f.0.0.2:{port}/",            # the same in inet_aton's hex spelling
    "http://[::ffff:127.0.0.2]:{port}/",    # and IPv4-mapped
    "http://10.1.2.3/",                     # private
    "http://192.168.1.1/",                  # private (the volunteer's router)
    "http://169.254.169.254/latest/",       # link-local (cloud metadata)
    "http://[fe80::1]/",                    # IPv6 link-local
    "http://[fd00::1]/",                    # IPv6 unique-local
])
async def test_redirect_into_local_network_is_recorded_not_fetched(http_server, other_host, target):
    url = _to(http_server, target.format(port=other_host.port))
    loop = asyncio.get_running_loop()
    start = loop.time()
    entries = await get(url)
    assert loop.time() - start < 1.0  # refused before any connection attempt
    assert [e["response"].get("code") for e in entries] == [302, None]
    refused = entries[1]
    assert refused["failure"] == failures.ADDRESS_REFUSED
    assert refused["request"]["url"] == str(URL(target.format(port=other_host.port)))
    assert refused["x_redirect_index"] == 1 and refused["x_address"] is None
    assert other_host.hits == {}


async def test_redirect_to_a_name_resolving_to_loopback_is_refused(http_server, other_host, monkeypatch):
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):  # a public-looking name whose DNS says 127.0.0.2
        if host == "innocent.example":
            return real("127.0.0.2", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    entries = await get(_to(http_server, f"http://innocent.example:{other_host.port}/"))
    assert entries[-1]["failure"] == failures.ADDRESS_REFUSED
    assert other_host.hits == {}
    # `localhost` too (from a site on 127.0.0.2): a name, resolved, then checked.
    entries = await get(_to(other_host, f"http://localhost:{http_server.port}/page"))
    assert entries[-1]["failure"] == failures.ADDRESS_REFUSED
    assert "/page" not in http_server.hits


async def test_redirect_into_allowed_network_is_followed(http_server, other_host, monkeypatch):
    # The lab's public ranges (--public-network) are followed, and only the
    # checked address is connected to.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.2" if host == "site.example" else host, *a, **k))
    allow = Policy.from_cidrs(["127.0.0.2/32"])
    for target in (other_host.url("/"), f"http://site.example:{other_host.port}/"):
        entries = await get(_to(http_server, target), allow=allow)
        assert [e["response"]["code"] for e in entries] == [302, 200]
        assert entries[-1]["failure"] is None and entries[-1]["x_address"] == f"127.0.0.2:{other_host.port}"
    assert other_host.hits == {"/": 2}


async def test_redirect_back_to_the_inputs_own_address_is_followed(http_server):
    # The volunteer chose the input's address: redirects may come back to it
    # (how every loopback test site redirects), whatever its range.
    entries = await get(_to(http_server, http_server.url("/page")))
    assert [e["response"]["code"] for e in entries] == [302, 200]


async def test_endless_deflate_stream_is_bounded(endless_server):
    # `78 01` then `00 00 00 ff ff` forever: decodes to nothing, so the body
    # cap never triggers. It produced 61,000 events and a 7.2 MB record.
    events = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    [entry] = await get(endless_server.url("/endless-deflate"), events=events, timeouts=Timeouts(connect=1, http=10))
    assert loop.time() - start < 5.0
    assert entry["failure"] is None and entry["response"]["body_is_truncated"] is True
    assert entry["x_body_length"] == 0
    assert len(events) <= 64
    wire = sum(e["num_bytes"] for e in events)
    assert http.WIRE_FACTOR * http.MAX_BODY <= wire < http.WIRE_FACTOR * http.MAX_BODY + 256 * 1024
    assert len(json.dumps([entry, events])) < 64 * 1024


async def test_slow_endless_deflate_ends_at_the_deadline(endless_server):
    events = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    [entry] = await get(endless_server.url("/endless-deflate-slow"), events=events, timeouts=Timeouts(connect=1, http=1.0))
    assert loop.time() - start < 2.0
    assert entry["failure"] == failures.GENERIC_TIMEOUT
    assert 0 < len(events) <= 64


async def test_events_merged_past_64_keep_bytes_and_last_arrival(endless_server):
    events = []
    [entry] = await get(endless_server.url("/endless-chunked"), events=events)
    assert entry["response"]["body_is_truncated"] is True and entry["x_body_length"] == http.MAX_BODY
    assert 32 <= len(events) <= 64
    assert sum(e["num_bytes"] for e in events) >= http.MAX_BODY
    times = [e["t"] for e in events]
    assert times == sorted(times) and times[-1] <= entry["t"]


async def test_header_flood_stored_within_cap(endless_server):
    entries = await get(endless_server.url("/header-flood"))
    assert len(entries) == 11 and entries[-1]["failure"] == failures.HTTP_TOO_MANY_REDIRECTS
    for entry in entries:
        kept = entry["response"]["headers_list"]
        assert sum(len(k) + len(v) for k, v in kept) <= http.MAX_HEADER_BYTES
        assert entry["response"]["x_headers_truncated"] is True
        assert entry["response"]["headers"]["Location"]  # the first headers are the ones kept
    assert len(json.dumps(entries)) < 11 * 3 * http.MAX_HEADER_BYTES


async def test_redirect_bodies_capped(endless_server):
    entries = await get(endless_server.url("/fat-redirect"), max_redirects=3)
    assert all(e["x_body_length"] == http.MAX_REDIRECT_BODY for e in entries)
    assert all(e["response"]["body_is_truncated"] for e in entries)


def test_event_sampler_merges_pairwise():
    from probes.records import EventSampler, network_event

    sampler = EventSampler(limit=8)
    for i in range(1000):
        sampler.add(network_event(operation="bytes_received", t=float(i), transaction_id=1, num_bytes=1))
    assert len(sampler.events) <= 8
    assert sum(e["num_bytes"] for e in sampler.events) == 1000
    assert sampler.events[-1]["t"] == 999.0
    assert [e["t"] for e in sampler.events] == sorted(e["t"] for e in sampler.events)
