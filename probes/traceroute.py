"""Traceroute with the triggering content (after CenTrace): where on the path
does interference begin, and does the device sit in the path or beside it?

What it sends, for one input URL: TTL-limited probes that carry what a
censor looks at — a DNS query for the domain (UDP, to ``target``:53, an
address that runs no resolver: the control helper's by default), and an
HTTP request with its ``Host`` (http URLs) or a TLS ClientHello with its SNI
(https URLs) over a TCP connection to the site made with the normal TTL, the
request alone sent with TTL t. The same probes carry a control domain
(``example.com`` by default) that no censor blocks.

At each TTL a probe either expires at a router (ICMP time-exceeded: the
router's address), arrives (an answer from the destination, or its ICMP
port-unreachable), meets interference (a forged DNS answer, a RST or a
block page that the control probe at the same TTL did not get) or gets no
answer while the control probe did (dropped). The first TTL t where the
test probe differs from the control is where interference begins; the device
sits just after the last hop that answered (hop t - 1; its address and ASN
are reported), or on the link after it. **in-path**: the original never goes
on (nothing arrives or expires beyond the device); **on-path**: it goes on,
the device only injects.

Censors keep state (residual censorship: after a trigger, a device may
block the same client and server for a while, whatever the next packet
carries), so, as CenTrace does, the test probes go out one TTL after the
other, and after a probe that met interference the next one waits
``pause`` seconds (``PAUSE`` by default; ``--pause``); so does the next run
after a run that met interference. A probe is done as soon as its answer is
conclusive (the ICMP time-exceeded of a router, or the destination's own
answer) plus ``GRACE`` for an injection racing it, else after ``window``.
The control probes, which no censor blocks, go out all at once. The record
says which pauses were taken (``x_pause``, and ``paused`` on each hop).

The sweep is repeated (``runs``, 3 by default); the record says how many
runs agreed. Each probe has a source port of its own, and ICMP answers are
matched to it by the quoted source port (df-003 ``answer_flags: ["ipsrc"]``).
The censor's hop is reported with its address and its ASN (``x_censor_asn``,
from the geolocation database the probe uses — `vantage geo update`,
``geo_db``; null without one).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import struct
from typing import Any
from urllib.parse import urlsplit

from core.net import USER_AGENT

from .context import ProbeContext
from .dns_injection import build_query, packet_row, parse_answer, target_of
from .packets import (ACK, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, RST, Listener, flow_program, icmp_program,
                      local_address_towards, packet_entry, report, setting)
from .records import Clock

TEST_NAME = "traceroute"
TEST_VERSION = "0.1.0"
CONTROL_DOMAIN = "example.com"
MAX_TTL = 20
RUNS = 3
PAUSE = 5.0      # seconds after a probe, and after a run, that met interference (residual censorship)
WINDOW = 1.5     # seconds to listen after a probe went out, at most
GRACE = 0.25     # seconds to listen on after a conclusive answer (an injected packet may trail it)
CONNECT_TIMEOUT = 5.0
CONCURRENCY = 8  # URLs traced at once at most (`vantage run traceroute` caps --concurrency to it)


def new_test_keys() -> dict[str, Any]:
    return {"answer_flags": ["ipsrc"], "sent_packets": [], "answered_packets": [], "x_control_domain": None,
            "x_destinations": {}, "x_runs": [], "x_interference": None, "x_censor_hop": None,
            "x_censor_address": None, "x_censor_asn": None, "x_position": None, "x_probe": None,
            "x_runs_total": 0, "x_agreeing_runs": 0, "x_pause": None, "x_packets": []}


def deadline(ctx: ProbeContext) -> float:
    """The longest a traceroute of one URL may take (the runner's deadline for
    it, instead of the web test's 60 s): every probe of every run timing out,
    and every pause taken — a bound against a hang, not an estimate."""
    runs = setting(ctx, "runs", RUNS)
    pause = setting(ctx, "pause", PAUSE)
    window = setting(ctx, "window", WINDOW)
    probe = CONNECT_TIMEOUT + window
    sweep = probe + MAX_TTL * (probe + pause)  # the controls at once, then the test probes one by one
    return ctx.timeouts.dns + runs * (2 * sweep + pause) + 10.0


def outcome_label(keys: dict[str, Any]) -> str:
    if keys.get("x_interference"):
        return f"interference at hop {keys.get('x_censor_hop')} ({keys.get('x_position')})"
    return "no interference" if keys.get("x_runs_total") else "not measured"


# --- one probe at one TTL ----------------------------------------------------------


def _client_hello(domain: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=domain)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _http_request(domain: str) -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: {domain}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n").encode()


def _observe(kind: str, ttl: int, dest: str, icmp: list, flow: list, sent_end: int | None) -> dict[str, Any]:
    """What one probe saw: ``expired`` (ICMP time-exceeded, from whom), ``arrived``
    (the destination answered as a destination does), ``injected`` (an answer no
    destination at this TTL would give: a DNS answer from a resolver-less
    address, a RST), or nothing."""
    out: dict[str, Any] = {"ttl": ttl, "expired_from": None, "arrived": False, "injected": False, "details": []}
    for p in icmp:
        if p.icmp_type == 11 and out["expired_from"] is None:
            out["expired_from"] = p.src
        elif p.icmp_type == 3 and p.src == dest:
            out["arrived"] = True  # port unreachable from the destination itself
        out["details"].append(f"icmp {p.icmp_type}/{p.icmp_code} from {p.src} ttl={p.ip_ttl} id={p.ip_id}")
    for p in flow:
        if kind == "dns":
            answers, rcode, _ = parse_answer(p.payload)
            out["injected"] = True
            out["details"].append(f"dns answer {[a.get('ipv4') or a.get('ipv6') for a in answers]} rcode={rcode} "
                                  f"ttl={p.ip_ttl} id={p.ip_id}")
        elif p.flags & RST:
            out["injected"] = True
            out["details"].append(f"rst ttl={p.ip_ttl} id={p.ip_id}")
        elif p.payload or (p.flags & ACK and sent_end is not None and ((p.ack - sent_end) & 0xFFFFFFFF) < 0x80000000):
            out["arrived"] = True  # data, or an ACK covering our request: the original got there
            out["details"].append(f"{'data' if p.payload else 'ack'} ttl={p.ip_ttl} id={p.ip_id}")
    return out


def _conclusive(seen: dict[str, Any]) -> bool:
    """Nothing more to learn from this probe: a router said it expired, or the destination answered."""
    return bool(seen["expired_from"] or seen["arrived"])


async def _listen(observe, listeners: list[Listener], window: float) -> None:
    """Listen up to ``window`` seconds, or ``GRACE`` past the moment ``observe()`` is conclusive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    while loop.time() < deadline:
        if _conclusive(observe()):
            await asyncio.sleep(min(GRACE, max(0.0, deadline - loop.time())))
            return
        events = [asyncio.ensure_future(lst._event.wait()) for lst in listeners if lst._event is not None]
        try:
            await asyncio.wait(events, timeout=deadline - loop.time())
        finally:
            for event in events:
                event.cancel()
        for lst in listeners:
            if lst._event is not None:
                lst._event.clear()


async def _dns_probe(dest: str, domain: str, ttl: int, clock: Clock, window: float) -> tuple[dict, list]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        wire = build_query(domain, int.from_bytes(os.urandom(2), "big"))
        with Listener(IPPROTO_ICMP, icmp_program(port), clock, max_packets=8) as icmp, \
                Listener(IPPROTO_UDP, flow_program([dest], 53, port), clock, max_packets=8) as flow:
            t = clock.now()
            await asyncio.get_running_loop().sock_sendto(sock, wire, (dest, 53))
            await _listen(lambda: _observe("dns", ttl, dest, icmp.packets, flow.packets, None), [icmp, flow], window)
        seen = _observe("dns", ttl, dest, icmp.packets, flow.packets, None)
        return seen, icmp.packets + flow.packets, [_sent("udp", dest, port, 53, ttl, wire, t)]
    finally:
        sock.close()


async def _tcp_probe(kind: str, dest: str, port: int, domain: str, ttl: int, clock: Clock, window: float) -> tuple[dict, list]:
    payload = _client_hello(domain) if kind == "tls" else _http_request(domain)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind(("", 0))
        lport = sock.getsockname()[1]
        with Listener(IPPROTO_ICMP, icmp_program(lport), clock, max_packets=8) as icmp, \
                Listener(IPPROTO_TCP, flow_program([dest], port, lport), clock, max_packets=16) as flow:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (dest, port)), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                return {"ttl": ttl, "expired_from": None, "arrived": False, "injected": False,
                        "connect_failure": type(exc).__name__, "details": []}, [], []
            syn_ack = [p for p in flow.packets if p.flags & 0x12 == 0x12]
            sent_end = None
            if syn_ack:
                sent_end = (syn_ack[0].ack + len(payload)) & 0xFFFFFFFF  # SYN-ACK's ack is our first data byte
            flow.packets.clear()
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            t = clock.now()
            try:
                await loop.sock_sendall(sock, payload)
            except OSError:
                pass
            await _listen(lambda: _observe(kind, ttl, dest, icmp.packets, flow.packets, sent_end), [icmp, flow], window)
            seen = _observe(kind, ttl, dest, icmp.packets, flow.packets, sent_end)
            packets = icmp.packets + syn_ack + flow.packets
            numbers = (syn_ack[0].ack, (syn_ack[0].seq + 1) & 0xFFFFFFFF) if syn_ack else (0, 0)
        return seen, packets, [_sent("tcp", dest, lport, port, ttl, payload, t, numbers)]
    finally:
        try:
            # Leave no half-open connection behind: a RST at full TTL.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()


def _sent(proto: str, dest: str, sport: int, dport: int, ttl: int, payload: bytes, t: float,
          numbers: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """df-003's record of a sent probe: the packet as it left (IP header with
    its TTL; TCP with the connection's sequence numbers), from our address
    (127.0.0.1 in the record, df-003's privacy rule)."""
    own = local_address_towards(dest)
    try:
        from scapy.layers.inet import IP, TCP, UDP

        layer = UDP(sport=sport, dport=dport) if proto == "udp" else \
            TCP(sport=sport, dport=dport, flags="PA", seq=numbers[0], ack=numbers[1])
        raw = bytes(IP(src=own or "0.0.0.0", dst=dest, ttl=ttl) / layer / payload)
    except Exception:  # no scapy: the payload alone
        raw = payload
    return {"raw": raw, "own": own, "ttl": ttl, "t": t}


async def _probe(kind: str, dest: str, port: int, domain: str, ttl: int, clock: Clock, window: float):
    if kind == "dns":
        return await _dns_probe(dest, domain, ttl, clock, window)
    return await _tcp_probe(kind, dest, port, domain, ttl, clock, window)


# --- a sweep and its reading -------------------------------------------------------


def _differs(test: dict, control: dict) -> bool:
    if test["injected"] and not control["injected"]:
        return True
    quiet = not (test["expired_from"] or test["arrived"] or test["injected"])
    return quiet and bool(control["expired_from"] or control["arrived"])


def locate(hops: list[dict]) -> tuple[int | None, str | None, str | None]:
    """(censor hop, its address, position) from one sweep's per-TTL pairs."""
    for i, pair in enumerate(hops):
        test, control = pair["test"], pair["control"]
        if not _differs(test, control):
            continue
        hop = pair["ttl"] - 1
        address = None
        for earlier in reversed(hops[:i]):
            address = earlier["control"]["expired_from"] or earlier["test"]["expired_from"]
            if address:
                hop = earlier["ttl"]
                break
        went_on = any(p["test"]["arrived"] or (p["test"]["expired_from"] and p["ttl"] >= pair["ttl"]) for p in hops[i:])
        return hop, address, "on-path" if went_on else "in-path"
    return None, None, None


async def sweep(kind: str, dest: str, port: int, domain: str, control_domain: str, clock: Clock, window: float,
                max_ttl: int = MAX_TTL, pause: float = PAUSE) -> tuple[list[dict], list]:
    """One traceroute: the control probes at every TTL at once, then the test
    probes one TTL after the other, up to one past where the control arrived;
    after a test probe that differs from its control (blocked), ``pause``
    seconds before the next (``paused`` on that hop)."""
    controls = await asyncio.gather(*(_probe(kind, dest, port, control_domain, t, clock, window) for t in range(1, max_ttl + 1)))
    arrived = [c["ttl"] for c, *_ in controls if c["arrived"]]
    answered = [c["ttl"] for c, *_ in controls if c["expired_from"] or c["arrived"]]
    last = min(max_ttl, (arrived[0] if arrived else (max(answered) if answered else 1)) + 1)
    hops, packets, sent = [], [], []
    for ttl in range(1, last + 1):
        test, seen, out = await _probe(kind, dest, port, domain, ttl, clock, window)
        pair = {"ttl": ttl, "test": test, "control": controls[ttl - 1][0], "paused": None}
        hops.append(pair)
        packets += seen
        sent += out
        if ttl < last and _differs(test, pair["control"]):
            pair["paused"] = pause
            await asyncio.sleep(pause)
    return hops, packets, sent


def _asn(address: str | None) -> str | None:
    if not address:
        return None
    try:
        from .config import load_config
        from .geo import GeoDB

        directory = os.environ.get("VANTAGE_GEO_DB") or load_config(None).geo_db
        with GeoDB(directory) as db:
            asn = db.lookup(address)[1]
        return None if asn == "AS0" else asn
    except Exception:  # no database, or an address it does not know
        return None


async def _site_address(domain: str, ctx: ProbeContext, clock: Clock) -> str | None:
    """The site's IPv4 address: from ``--resolver`` when given (the run's UDP
    resolver), else the system's. A forged answer is kept: the TCP probes then
    compare test and control towards it, and the DNS probe shows the forgery."""
    if ctx.resolver:
        from . import dns

        queries = await dns.udp_lookup(domain, ctx.resolver, "A", clock=clock, txid=0, timeout=ctx.timeouts.dns, linger=0.0)
        found = [a for a in dns.first_addresses(queries) if ":" not in a]
        return found[0] if found else None
    return await asyncio.get_running_loop().run_in_executor(None, _resolve, domain)


def _resolve(domain: str) -> str | None:
    try:
        return socket.getaddrinfo(domain, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return None


async def measure(url: str, ctx: ProbeContext, keys: dict[str, Any], clock: Clock | None = None):
    clock = clock or Clock()
    parts = urlsplit(url)
    domain = (parts.hostname or url).lower().rstrip(".")
    control_domain = setting(ctx, "control_domain", CONTROL_DOMAIN)
    runs = setting(ctx, "runs", RUNS)
    pause = setting(ctx, "pause", PAUSE)
    window = setting(ctx, "window", WINDOW)
    keys["x_control_domain"] = control_domain
    keys["x_pause"] = pause
    plans = []
    dns_dest = target_of(ctx)
    if dns_dest:
        plans.append(("dns", dns_dest, 53))
    site = await _site_address(domain, ctx, clock)
    if site and parts.scheme in ("http", "https"):
        plans.append(("tls" if parts.scheme == "https" else "http", site, parts.port or (443 if parts.scheme == "https" else 80)))
    keys["x_destinations"] = {kind: f"{dest}:{port}" for kind, dest, port in plans}
    results = []
    for run in range(runs):
        entry: dict[str, Any] = {"run": run, "probes": {}, "censor_hop": None, "censor_address": None, "position": None,
                                 "probe": None}
        for kind, dest, port in plans:
            hops, packets, sent = await sweep(kind, dest, port, domain, control_domain, clock, window, pause=pause)
            hop, address, position = locate(hops)
            entry["probes"][kind] = {"hops": hops, "censor_hop": hop, "censor_address": address, "position": position}
            if run == 0:
                own = local_address_towards(dest)
                for out in sent[:32]:
                    keys["sent_packets"].append(packet_entry(out["raw"], out["own"], sent=True, x_t=out["t"],
                                                             x_ttl=out["ttl"], x_probe=kind))
                for p in packets[:64]:
                    keys["answered_packets"].append(packet_entry(p.raw, own, x_t=p.t, x_probe=kind))
                    keys["x_packets"].append(packet_row(p, f"traceroute_{kind}", None))
            if hop is not None and (entry["censor_hop"] is None or hop < entry["censor_hop"]):
                entry.update(censor_hop=hop, censor_address=address, position=position, probe=kind)
        entry["paused"] = None
        results.append(entry)
        keys["x_runs"].append(entry)
        if entry["censor_hop"] is not None and run + 1 < runs:
            entry["paused"] = pause
            await asyncio.sleep(pause)
    votes = collections.Counter((r["censor_hop"], r["censor_address"], r["position"], r["probe"]) for r in results)
    (hop, address, position, probe), agreeing = votes.most_common(1)[0] if votes else ((None, None, None, None), 0)
    keys.update(x_interference=hop is not None, x_censor_hop=hop, x_censor_address=address, x_position=position,
                x_probe=probe, x_runs_total=len(results), x_agreeing_runs=agreeing, x_censor_asn=_asn(address))
    report(TEST_NAME, url, keys)
    return None


def json_line(record: dict[str, Any]) -> dict[str, Any]:
    """The --json contract."""
    keys = record.get("test_keys") or {}
    return {"input": record.get("input"), "interference": bool(keys.get("x_interference")),
            "censor_hop": keys.get("x_censor_hop"), "censor_address": keys.get("x_censor_address"),
            "position": keys.get("x_position"), "runs": keys.get("x_runs_total"),
            "agreeing_runs": keys.get("x_agreeing_runs"), "asn": keys.get("x_censor_asn"),
            "probe": keys.get("x_probe")}
