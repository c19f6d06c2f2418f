"""The censor's on-path packet inspector: an NFQUEUE worker.

Run inside the censor namespace as ``python -m lab.dpi --config FILE``. The
Censor (lab/censor.py) queues only what needs a look — UDP/TCP port 53 and the
first few data-carrying packets of TCP 80/443 flows — and this worker gives
each packet a verdict:

* accept, untouched (no rule matches; also on any parse error: a censor that
  crashes or stalls on an odd packet would look like a network fault);
* accept with a mark, which the censor's later iptables chains act upon
  (DROP_MARK: the flow is dropped from now on; a throttle mark: the flow is
  steered into a slow htb class). An NFQUEUE accept verdict ends the queueing
  chain, so nothing in that chain could act on the mark; the Censor's rules in
  the later filter/mangle hooks do;
* drop (a UDP DNS query for a dns-drop domain);
* accept after a delay (a dns-inject query: the forged answer must win the race
  reliably, so the genuine query waits a little).

Forged packets (DNS answers, TCP RSTs, block pages) go out through a raw
socket whose SO_MARK lets the Censor exempt them from connection tracking, so
they neither disturb the tracked flow nor clash with the held query's entry.

Both IP versions: the parsers read IPv4 and IPv6 (a fixed header; packets
with extension headers are not ours to judge and pass), forged packets are
built with the version of the packet they answer, and a rule with a
``family`` only matches packets of that version.

The packet parsers below are pure functions so they can be tested without root.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import logging
import re
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from probes.packets import tcp_header

log = logging.getLogger("vantage.lab.dpi")

DEFAULT_HOLD_MS = 80


# --------------------------------------------------------------------------
# Parsing


@dataclass
class Packet:
    """The IPv4/IPv6 and TCP/UDP fields the rules look at."""

    src: str
    dst: str
    proto: int  # 6 TCP, 17 UDP
    sport: int
    dport: int
    payload: bytes
    seq: int = 0
    ack: int = 0
    flags: int = 0
    version: int = 4


def _transport(src: str, dst: str, proto: int, body: bytes, version: int) -> Packet | None:
    if proto == 6:
        tcp = tcp_header(body)
        if tcp is None:
            return None
        sport, dport, seq, ack, flags, doff = tcp
        if doff < 20 or doff > len(body):
            return None
        return Packet(src, dst, proto, sport, dport, body[doff:], seq, ack, flags, version)
    if proto == 17:
        if len(body) < 8:
            return None
        sport, dport, length = struct.unpack_from("!HHH", body)
        return Packet(src, dst, proto, sport, dport, body[8:max(8, min(length, len(body)))], version=version)
    return None


def parse_ip6(raw: bytes) -> Packet | None:
    """IPv6 TCP/UDP whose next header follows the fixed header; None otherwise."""
    if len(raw) < 40 or raw[0] >> 4 != 6:
        return None
    payload_length = struct.unpack_from("!H", raw, 4)[0]
    if len(raw) < 40 + payload_length:
        return None
    src = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    dst = socket.inet_ntop(socket.AF_INET6, raw[24:40])
    return _transport(src, dst, raw[6], raw[40:40 + payload_length], 6)


def parse_ip(raw: bytes) -> Packet | None:
    """IPv4 or IPv6, TCP/UDP only; None for anything else or anything malformed."""
    if len(raw) >= 1 and raw[0] >> 4 == 6:
        return parse_ip6(raw)
    if len(raw) < 20 or raw[0] >> 4 != 4:
        return None
    ihl = (raw[0] & 0x0F) * 4
    total = struct.unpack_from("!H", raw, 2)[0]
    if ihl < 20 or total < ihl or len(raw) < total:
        return None
    # Fragments other than the first carry no transport header; not our business.
    if struct.unpack_from("!H", raw, 6)[0] & 0x1FFF:
        return None
    proto = raw[9]
    src, dst = socket.inet_ntoa(raw[12:16]), socket.inet_ntoa(raw[16:20])
    return _transport(src, dst, proto, raw[ihl:total], 4)


def matches(name: str | None, domain: str) -> bool:
    """A rule for ``domain`` also covers its subdomains, as real blocklists do."""
    if not name:
        return False
    name, domain = name.lower().rstrip("."), domain.lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def parse_sni(data: bytes) -> str | None:
    """Server name from a TLS ClientHello at the start of ``data``.

    Tolerant of truncation: a ClientHello longer than one segment still yields
    its SNI if the server_name extension is within ``data``."""
    try:
        if len(data) < 6 or data[0] != 0x16 or data[1] != 0x03 or data[5] != 0x01:
            return None
        p = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        p += 1 + data[p]  # session id
        p += 2 + struct.unpack_from("!H", data, p)[0]  # cipher suites
        p += 1 + data[p]  # compression methods
        end = p + 2 + struct.unpack_from("!H", data, p)[0]
        p += 2
        while p + 4 <= min(end, len(data)):
            ext_type, ext_len = struct.unpack_from("!HH", data, p)
            p += 4
            if ext_type == 0:
                q = p + 2  # skip server_name_list length
                while q + 3 <= p + ext_len and q + 3 <= len(data):
                    name_type, name_len = data[q], struct.unpack_from("!H", data, q + 1)[0]
                    q += 3
                    if name_type == 0 and q + name_len <= len(data):
                        return data[q:q + name_len].decode("ascii", "replace").lower()
                    q += name_len
                return None
            p += ext_len
    except (IndexError, struct.error):
        return None
    return None


_REQUEST_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r?\n")


def parse_http_host(data: bytes) -> str | None:
    """Host header of an HTTP/1.x request at the start of ``data`` (port stripped)."""
    if not _REQUEST_LINE.match(data):
        return None
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            if host.startswith("["):
                return host[1:host.find("]")] if "]" in host else None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def parse_dns_query(wire: bytes):
    """A dns.message.Message if ``wire`` is a standard query, else None."""
    import dns.exception
    import dns.message
    import dns.opcode

    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return None
    if msg.flags & 0x8000 or msg.opcode() != dns.opcode.QUERY or not msg.question:
        return None
    return msg


def qname_of(msg) -> str:
    return msg.question[0].name.to_text(omit_final_dot=True).lower()


# --------------------------------------------------------------------------
# Forging (scapy computes the checksums)


def _ip(src: str, dst: str):
    """An IPv4 or IPv6 header (scapy layer) from ``src`` to ``dst``."""
    if ":" in src:
        from scapy.layers.inet6 import IPv6

        return IPv6(src=src, dst=dst, hlim=64)
    from scapy.layers.inet import IP

    return IP(src=src, dst=dst, ttl=64)


def forge_dns_answer(query_pkt: Packet, query, answer: str) -> bytes:
    """A response to ``query`` that looks as if it came from the queried server."""
    import dns.message
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset
    from scapy.layers.inet import UDP

    response = dns.message.make_response(query)
    response.flags |= 0x0080  # recursion available, like the resolver it impersonates
    rdtype = dns.rdatatype.AAAA if ":" in answer else dns.rdatatype.A
    rrset = dns.rrset.from_text(query.question[0].name, 300, dns.rdataclass.IN, rdtype, answer)
    response.answer.append(rrset)
    return bytes(_ip(query_pkt.dst, query_pkt.src)
                 / UDP(sport=query_pkt.dport, dport=query_pkt.sport) / response.to_wire())


def forge_resets(p: Packet) -> list[bytes]:
    """RSTs for the TCP flow of client packet ``p`` (whose payload the censor
    drops): one to the client as if from the server, one to the server as if
    from the client. The sequence numbers are exactly what each end expects
    next, so neither treats the RST as out of window."""
    from scapy.layers.inet import TCP

    next_client_seq = (p.seq + len(p.payload)) & 0xFFFFFFFF
    to_client = _ip(p.dst, p.src) / TCP(sport=p.dport, dport=p.sport, seq=p.ack, ack=next_client_seq, flags="RA", window=0)
    # The request is dropped, so the server still expects p.seq.
    to_server = _ip(p.src, p.dst) / TCP(sport=p.sport, dport=p.dport, seq=p.seq, flags="R", window=0)
    return [bytes(to_client), bytes(to_server)]


def blockpage_response(page: str, status: int) -> bytes:
    from http import HTTPStatus

    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Blocked"
    body = (f"<!DOCTYPE html>\n<html><head><title>Access restricted</title></head>"
            f"<body><h1>Access restricted</h1><p>{page}</p></body></html>\n").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def forge_blockpage(p: Packet, page: str, status: int) -> list[bytes]:
    """The censor's answer to request ``p`` as the server's next segments: the
    response (split to fit one MSS), then a FIN, then a RST to the server so it
    forgets the connection whose request it never saw."""
    from scapy.layers.inet import TCP

    data = blockpage_response(page, status)
    ack = (p.seq + len(p.payload)) & 0xFFFFFFFF
    seq = p.ack
    out = []
    for i in range(0, len(data), 1200):
        chunk = data[i:i + 1200]
        out.append(bytes(_ip(p.dst, p.src) / TCP(sport=p.dport, dport=p.sport, seq=seq, ack=ack, flags="PA", window=65535) / chunk))
        seq = (seq + len(chunk)) & 0xFFFFFFFF
    out.append(bytes(_ip(p.dst, p.src) / TCP(sport=p.dport, dport=p.sport, seq=seq, ack=ack, flags="FA", window=65535)))
    out.append(bytes(_ip(p.src, p.dst) / TCP(sport=p.sport, dport=p.dport, seq=p.seq, flags="R", window=0)))
    return out


# --------------------------------------------------------------------------
# Decisions


@dataclass
class Decision:
    verdict: str = "accept"  # accept | drop
    mark: int | None = None
    hold_ms: int = 0
    inject: list[bytes] = field(default_factory=list)
    reason: str = ""


@dataclass
class Rule:
    action: str
    domain: str
    answer: str | None = None
    page: str | None = None
    status: int | None = None
    mark: int | None = None
    family: str | None = None  # None: both IP versions


class Inspector:
    def __init__(self, rules: list[Rule], drop_mark: int, hold_ms: int = DEFAULT_HOLD_MS):
        self.rules = rules
        self.drop_mark = drop_mark
        self.hold_ms = hold_ms

    def _first(self, actions: tuple[str, ...], name: str | None, version: int = 4) -> Rule | None:
        for rule in self.rules:
            if rule.action in actions and matches(name, rule.domain) and rule.family in (None, f"ipv{version}"):
                return rule
        return None

    def decide(self, raw: bytes) -> Decision:
        p = parse_ip(raw)
        if p is None or not p.payload:
            return Decision()
        if p.dport == 53:
            return self._dns(p)
        if p.proto == 6 and p.dport == 80:
            return self._http(p)
        if p.proto == 6 and p.dport == 443:
            return self._tls(p)
        return Decision()

    def _dns(self, p: Packet) -> Decision:
        wire = p.payload
        if p.proto == 6:
            # DNS over TCP: two-byte length prefix. Only whole messages in the
            # segment are parsed; a split query passes (rare for a query).
            if len(wire) < 2:
                return Decision()
            wire = wire[2:2 + struct.unpack_from("!H", wire)[0]]
        query = parse_dns_query(wire)
        if query is None:
            return Decision()
        qname = qname_of(query)
        rule = self._first(("dns-drop", "dns-inject"), qname, p.version)
        if rule is None:
            return Decision()
        if rule.action == "dns-drop":
            if p.proto == 6:
                # Drop this and every later packet of the TCP connection.
                return Decision(mark=self.drop_mark, reason=f"dns-drop tcp {qname}")
            return Decision(verdict="drop", reason=f"dns-drop {qname}")
        # dns-inject: UDP only (an on-path injector cannot easily win a TCP race).
        if p.proto != 17:
            return Decision()
        # The forged address answers queries of its own type (A for an IPv4
        # answer, AAAA for an IPv6 one; ANY either way).
        if query.question[0].rdtype not in ((28 if ":" in (rule.answer or "") else 1), 255):
            return Decision(reason=f"dns-inject {qname}: not a query for the answer's type, passed")
        forged = forge_dns_answer(p, query, rule.answer or "")
        return Decision(hold_ms=self.hold_ms, inject=[forged], reason=f"dns-inject {qname} -> {rule.answer}")

    def _http(self, p: Packet) -> Decision:
        host = parse_http_host(p.payload)
        rule = self._first(("http-reset", "http-blockpage", "throttle"), host, p.version)
        if rule is None:
            return Decision()
        if rule.action == "throttle":
            return Decision(mark=rule.mark, reason=f"throttle host {host}")
        if rule.action == "http-reset":
            return Decision(mark=self.drop_mark, inject=forge_resets(p), reason=f"http-reset {host}")
        return Decision(mark=self.drop_mark, inject=forge_blockpage(p, rule.page or "Access restricted", rule.status or 200),
                        reason=f"http-blockpage {host}")

    def _tls(self, p: Packet) -> Decision:
        sni = parse_sni(p.payload)
        rule = self._first(("tls-reset", "tls-drop", "throttle"), sni, p.version)
        if rule is None:
            return Decision()
        if rule.action == "throttle":
            return Decision(mark=rule.mark, reason=f"throttle sni {sni}")
        if rule.action == "tls-reset":
            return Decision(mark=self.drop_mark, inject=forge_resets(p), reason=f"tls-reset {sni}")
        return Decision(mark=self.drop_mark, reason=f"tls-drop {sni}")


# --------------------------------------------------------------------------
# Worker


class Worker:
    def __init__(self, config: dict):
        self.config = config
        self.inspector = Inspector(
            [Rule(**r) for r in config["rules"]],
            drop_mark=config["drop_mark"],
            hold_ms=config.get("hold_ms", DEFAULT_HOLD_MS),
        )
        self.held: list[tuple[float, int, object]] = []  # (due, tie-breaker, packet)
        self.counter = 0
        self.stopping = False
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        # The Censor exempts packets carrying this mark from conntrack.
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, config["inject_mark"])
        self.raw6 = None
        try:
            # IPPROTO_RAW on an IPv6 socket means "header included", as for IPv4.
            self.raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw6.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, config["inject_mark"])
        except OSError as exc:  # a kernel without IPv6: IPv4 forging still works
            log.warning("no IPv6 raw socket: %s", exc)

    def send(self, packet: bytes) -> None:
        if packet[0] >> 4 == 6:
            sock, dst = self.raw6, socket.inet_ntop(socket.AF_INET6, packet[24:40])
        else:
            sock, dst = self.raw, socket.inet_ntoa(packet[16:20])
        try:
            if sock is None:
                raise OSError("no IPv6 raw socket")
            sock.sendto(packet, (dst, 0))
        except OSError as exc:
            log.warning("sending forged packet to %s failed: %s", dst, exc)

    def on_packet(self, pkt) -> None:
        try:
            decision = self.inspector.decide(pkt.get_payload())
        except Exception:  # never let one odd packet take the censor down
            log.exception("inspection failed; accepting")
            decision = Decision()
        try:
            for forged in decision.inject:
                self.send(forged)
            if decision.reason:
                log.info("%s", decision.reason)
            if decision.mark is not None:
                pkt.set_mark(decision.mark)
            if decision.verdict == "drop":
                pkt.drop()
            elif decision.hold_ms:
                self.counter += 1
                heapq.heappush(self.held, (time.monotonic() + decision.hold_ms / 1000, self.counter, pkt))
            else:
                pkt.accept()
        except Exception:
            log.exception("verdict failed")

    def release_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self.held and (everything or self.held[0][0] <= now):
            _, _, pkt = heapq.heappop(self.held)
            try:
                pkt.accept()
            except Exception:
                log.exception("releasing held packet failed")

    def run(self) -> None:
        from netfilterqueue import NetfilterQueue

        nfq = NetfilterQueue()
        nfq.bind(self.config["queue"], self.on_packet, max_len=4096)
        fd = nfq.get_fd()
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        Path(self.config["ready"]).write_text("ready\n")
        log.info("bound to queue %d with %d rules", self.config["queue"], len(self.inspector.rules))
        try:
            # One thread: select on the queue socket, waking early when a held
            # packet is due, so holding a DNS query never blocks the rest.
            while not self.stopping:
                timeout = 0.5
                if self.held:
                    timeout = max(0.0, min(timeout, self.held[0][0] - time.monotonic()))
                try:
                    readable, _, _ = select.select([fd], [], [], timeout)
                except InterruptedError:
                    continue
                if readable:
                    try:
                        nfq.run(block=False)
                    except OSError as exc:
                        log.warning("queue read error: %s", exc)
                self.release_due()
        finally:
            self.release_due(everything=True)
            nfq.unbind()
            log.info("stopped")


def worker_config(prog: str, description: str, argv: list[str] | None) -> dict:
    """A censor worker's start (``python -m lab.dpi`` / ``lab.mitm --config
    FILE``, launched by lab/censor.py): the JSON config it was given, with
    logging set up to the config's ``log`` file."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    config = json.loads(args.config.read_text())
    logging.basicConfig(filename=config["log"], level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return config


def main(argv: list[str] | None = None) -> int:
    config = worker_config("python -m lab.dpi", __doc__.splitlines()[0], argv)
    for rule in config["rules"]:
        if rule.get("answer"):
            ipaddress.ip_address(rule["answer"])  # fail at start, not per packet
    # Import scapy before declaring readiness so the first forged packet is fast.
    import scapy.layers.inet  # noqa: F401
    import scapy.layers.inet6  # noqa: F401

    try:
        Worker(config).run()
    except Exception:
        log.exception("worker failed")
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
