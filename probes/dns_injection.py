"""DNS injection: a DNS query for the domain sent to an address that runs no
resolver. Nothing there can answer, so any answer was forged on the way (an
on-path injector, as GFWatch measures the Great Firewall's).

What it sends: one UDP DNS query (type A) for the input's domain to
``target``:53 (``--target``; by default the control helper's address). What
it records: every answer that comes back within ``WINDOW`` seconds, each with
its IP TTL, IP ID and arrival time (read from a raw socket whose kernel BPF
filter passes only this flow's packets), and the ICMP error the target
itself sends (port unreachable: it is reachable and runs no resolver).

Keys: OONI's dnst ``queries`` (one entry per answer, ``x_ip_ttl``,
``x_ip_id``) and df-003's ``sent_packets``, ``answered_packets``,
``answer_flags``; ``x_target``, ``x_injected``, ``x_icmp``, and
``x_packets`` (rows of the ``packets`` table).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from .context import ProbeContext
from .packets import (IPPROTO_ICMP, IPPROTO_UDP, Listener, flow_program, icmp_program, local_address_towards, packet_entry,
                      report, setting)
from .records import Clock

TEST_NAME = "dns_injection"
TEST_VERSION = "0.1.0"
WINDOW = 2.0  # seconds to listen: an injector answers at once, but several may


def new_test_keys() -> dict[str, Any]:
    return {"queries": [], "sent_packets": [], "answered_packets": [], "answer_flags": ["ipsrc"],
            "x_target": None, "x_injected": None, "x_icmp": [], "x_packets": []}


def outcome_label(keys: dict[str, Any]) -> str:
    if keys.get("x_target") is None:
        return "no target"
    return "injected" if keys.get("x_injected") else "no answer"


def target_of(ctx: ProbeContext) -> str | None:
    """``--target``, else the first helper's address (IPv4)."""
    target = setting(ctx, "target")
    if not target and ctx.helpers:
        host = urlsplit(ctx.helpers[0]).hostname
        if host:
            try:
                target = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
            except OSError:
                target = None
    return target


def build_query(domain: str, txid: int) -> bytes:
    import dns.message

    query = dns.message.make_query(domain, "A")
    query.id = txid
    return query.to_wire()


def parse_answer(payload: bytes) -> tuple[list[dict[str, Any]], str | None, int | None]:
    """(answers, rcode, id) of a DNS response; ([], None, None) if it is none."""
    import dns.message
    import dns.rcode

    from .records import dns_answer

    try:
        msg = dns.message.from_wire(payload)
    except Exception:  # not DNS at all: still an answer nobody should have sent
        return [], None, None
    answers = []
    for rrset in msg.answer:
        for rd in rrset:
            kind = {1: "A", 28: "AAAA", 5: "CNAME"}.get(rrset.rdtype, str(rrset.rdtype))
            answers.append(dns_answer(kind, rd.to_text().rstrip(".") if kind == "CNAME" else rd.to_text(), rrset.ttl))
    return answers, dns.rcode.to_text(msg.rcode()), msg.id


async def measure(url: str, ctx: ProbeContext, keys: dict[str, Any], clock: Clock | None = None):
    clock = clock or Clock()
    domain = (urlsplit(url).hostname or url).lower().rstrip(".")
    target = target_of(ctx)
    keys["x_target"] = target
    if not target:
        keys["x_injected"] = None
        report(TEST_NAME, url, keys)
        return None
    own = local_address_towards(target)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
        txid = int.from_bytes(os.urandom(2), "big")
        wire = build_query(domain, txid)
        with Listener(IPPROTO_UDP, flow_program([target], 53, port), clock, max_packets=32) as answers, \
                Listener(IPPROTO_ICMP, icmp_program(port), clock, max_packets=8) as icmp:
            t0 = clock.now()
            await asyncio.get_running_loop().sock_sendto(sock, wire, (target, 53))
            keys["sent_packets"].append(_sent(own or "0.0.0.0", target, port, wire, t0))
            await answers.wait(setting(ctx, "window", WINDOW))
        for index, seen in enumerate(answers.packets):
            found, rcode, answer_id = parse_answer(seen.payload)
            keys["queries"].append({
                "engine": "udp", "resolver_address": f"{target}:53", "hostname": domain, "query_type": "A",
                "answers": found, "failure": None, "rcode": rcode, "t0": t0, "t": seen.t, "transaction_id": 1,
                "x_response_index": index, "x_ip_ttl": seen.ip_ttl, "x_ip_id": seen.ip_id,
                "x_dns_id_matches": answer_id == txid,
            })
            keys["answered_packets"].append(packet_entry(seen.raw, own, x_t=seen.t))
            keys["x_packets"].append(packet_row(seen, "dns_answer", 1))
        for seen in icmp.packets:
            keys["x_icmp"].append({"src": seen.src, "icmp_type": seen.icmp_type, "icmp_code": seen.icmp_code,
                                   "ip_ttl": seen.ip_ttl, "ip_id": seen.ip_id, "t": seen.t})
            keys["x_packets"].append(packet_row(seen, "icmp", 1))
        keys["x_injected"] = bool(answers.packets)
    finally:
        sock.close()
    report(TEST_NAME, url, keys)
    return None


def _sent(own: str, target: str, port: int, wire: bytes, t: float) -> dict[str, Any]:
    try:
        from scapy.layers.inet import IP, UDP

        raw = bytes(IP(src=own, dst=target) / UDP(sport=port, dport=53) / wire)
    except Exception:  # no scapy: the DNS message alone
        raw = wire
    return packet_entry(raw, own, sent=True, x_t=t)


def packet_row(seen, kind: str, transaction_id: int | None, **extra: Any) -> dict[str, Any]:
    """One ``packets`` table row (probes/schema.sql) from a Seen packet."""
    return {"transaction_id": transaction_id, "kind": kind, "src": seen.src, "sport": seen.sport, "dport": seen.dport,
            "proto": seen.proto, "ip_ttl": seen.ip_ttl, "ip_id": seen.ip_id, "tcp_flags": seen.flag_text or None,
            "length": len(seen.raw), "t": seen.t, **extra}


def json_line(record: dict[str, Any]) -> dict[str, Any]:
    """The --json contract: {"input", "injected", "answers": [...]}."""
    keys = record.get("test_keys") or {}
    answers = [{"answers": q.get("answers"), "rcode": q.get("rcode"), "ip_ttl": q.get("x_ip_ttl"),
                "ip_id": q.get("x_ip_id"), "t": q.get("t"), "resolver_address": q.get("resolver_address")}
               for q in keys.get("queries") or []]
    return {"input": record.get("input"), "injected": bool(keys.get("x_injected")), "answers": answers}
