"""Packet evidence during a web measurement (`vantage run web`, on by default
when privileged — root or CAP_NET_RAW —, `--no-capture` to turn it off): a
bounded capture of each connection's telling packets, IPv4 and IPv6.

One raw TCP socket per address family for the whole run, so the kernel
copies a packet once however many measurements are in flight. Its BPF
program passes only SYN, FIN and RST segments from the servers being
measured, clipped to ``SNAPLEN`` bytes, and is re-attached only when a new
server address appears. Each connection a captured measurement makes is
claimed as it connects (the event loop's ``sock_connect`` is wrapped: the
socket is bound just before its SYN leaves, so its flow — server address,
port, local port — is known); a packet goes to the capture that claimed its
flow, and one of no claimed flow is dropped unread (four header bytes looked
at, with struct: no scapy dissection on this path). At most ``PER_FLOW``
packets per connection, ``MAX_FLOWS`` connections and ``MAX_PACKETS``
packets per measurement are kept, so memory is bounded whatever the site
sends; the bulk of a body never reaches user space. (Cost,
docs/benchmarks.md. Rejected: a socket per measurement with a per-flow
program, 0.8 ms of CPU a measurement, as the kernel copies every packet to
every raw socket before filtering; a run-wide program naming every flow,
4 ms, in re-attaches; reading in a thread, which only adds GIL hand-offs to
a path that takes microseconds a packet.)

When the capture ends, each kept packet is compared with the server's own
packet on that connection, its SYN-ACK (IP TTL — IPv6: hop limit — and IP
ID): a RST or FIN or response whose TTL differs came from a device nearer
(or farther) than the server — injected. A connection that never got a
SYN-ACK (refused: a RST answered the SYN) borrows another connection's
SYN-ACK to the same server, else one ICMP (ICMPv6) echo to the server gives
its TTL. Rows go to the ``packets`` table (``x_packets``);
analysis/sql/35_packets.sql reads them. What is stored is what the analysis
reads: every RST, every FIN that is not the server's own, and one SYN-ACK
per server (the baseline); the server's own FINs are only counted
(``x_capture_genuine_fins``) — four rows a clean measurement cost as much to
store as the rest of the measurement.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import struct
from typing import Any

from .packets import (FIN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, JEQ_K, LD_B_ABS, LD_B_IND, LD_H_ABS, LD_H_IND,
                      LD_W_ABS, LDX_B_MSH, RST, SYN, Listener, Program, _checksum, _ip_int, attach, flow_program,
                      flow_program6, have_privileges, open_raw6, parse, parse6, recv6)

SNAPLEN = 160
PER_FLOW = 12
MAX_PACKETS = 96
MAX_ADDRESSES = 250  # servers the run-wide program names at once (IPv4: jumps reach 255 instructions)
MAX_FLOWS = 32   # connections one measurement's filter names (retries, redirects to the same address)
ECHO_TIMEOUT = 1.0
MAX_ECHOES = 4   # servers one measurement pings for a baseline (they are pinged at once)


_PRIVILEGED: list[bool] = []
_CURRENT: contextvars.ContextVar["Capture | None"] = contextvars.ContextVar("vantage_capture", default=None)


def _privileged() -> bool:
    if not _PRIVILEGED:
        _PRIVILEGED.append(have_privileges())
    return _PRIVILEGED[0]


class Capture:
    """One measurement's capture: the packets of its own connections (their
    local ports are learnt as each connects), bounded per flow and in all."""

    def __init__(self, addresses: list[str], port: int, clock: Any):
        self.addresses, self.port, self.clock = addresses, port, clock
        self.flows: list[tuple[str, int, int]] = []
        self.packets: list = []
        self.per_flow: dict[tuple, int] = {}
        self.dropped = 0
        self.hubs: dict[int, "_Hub"] = {}  # address family -> the loop's hub
        self.token = None

    def claim(self, sock: socket.socket, address: Any) -> None:
        """Called just before ``sock`` connects to ``address``: bind it (so its
        port is known before the SYN leaves) and make the flow this capture's."""
        hub = self.hubs.get(sock.family)
        if hub is None or not isinstance(address, tuple) or len(self.flows) >= MAX_FLOWS or address[1] != self.port:
            return
        ip = _canonical(address[0])
        if ip not in self.addresses:
            return
        if sock.getsockname()[1] == 0:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "", 0))
        flow = (ip, address[1], sock.getsockname()[1])
        self.flows.append(flow)
        hub.owner[flow] = self

    def take(self, seen) -> None:
        flow = (seen.src, seen.sport, seen.dport)
        if len(self.packets) >= MAX_PACKETS or self.per_flow.get(flow, 0) >= PER_FLOW:
            self.dropped += 1
            return
        self.per_flow[flow] = self.per_flow.get(flow, 0) + 1
        if self.clock is not None:
            seen.t = self.clock.now()
        self.packets.append(seen)


class _Hub:
    """The run's capture socket of one address family: the kernel copies a
    packet once however many measurements run. Its BPF program passes SYN,
    FIN and RST segments from the servers being measured (re-attached only
    when a new address appears); each packet goes to the capture that claimed
    its flow, and a packet of no claimed flow is dropped unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, family: int = socket.AF_INET):
        self.family = family
        self.owner: dict[tuple[str, int, int], Capture] = {}
        self.active: dict[str, int] = {}   # address -> running captures measuring it
        self.filtered: list[str] = []
        if family == socket.AF_INET6:
            self.sock = open_raw6(IPPROTO_TCP)
            self.program = flow_program6
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_TCP)
            self.program = flow_program
        try:
            attach(self.sock, self.program([], None, []))
            loop.add_reader(self.sock.fileno(), self._read6 if family == socket.AF_INET6 else self._read)
        except BaseException:
            self.sock.close()
            raise

    def want(self, addresses: list[str]) -> None:
        for a in addresses:
            self.active[a] = self.active.get(a, 0) + 1
        if any(a not in self.filtered for a in addresses):
            # Past the cap, the newest measurement's servers are kept (older ones
            # lose theirs first): else every later measurement would miss its own
            # and re-attach the program each time.
            self.filtered = list(dict.fromkeys([*addresses, *self.active]))[:MAX_ADDRESSES]
            attach(self.sock, self.program(self.filtered, None, None, flags=SYN | FIN | RST, snaplen=SNAPLEN), drain=False)

    def release(self, capture: Capture) -> None:
        for flow in capture.flows:
            if self.owner.get(flow) is capture:
                del self.owner[flow]
        for a in capture.addresses:
            if (":" in a) != (self.family == socket.AF_INET6):
                continue
            left = self.active.get(a, 0) - 1
            if left > 0:
                self.active[a] = left
            else:
                self.active.pop(a, None)  # stays in the program until the next change

    def _read(self) -> None:
        while True:
            try:
                raw = self.sock.recv(SNAPLEN)
            except (BlockingIOError, InterruptedError, OSError):
                return
            if len(raw) < 24:
                continue
            ihl = (raw[0] & 0x0F) * 4
            key = (socket.inet_ntoa(raw[12:16]), int.from_bytes(raw[ihl:ihl + 2], "big"), int.from_bytes(raw[ihl + 2:ihl + 4], "big"))
            capture = self.owner.get(key)
            if capture is not None:
                seen = parse(raw)
                if seen is not None:
                    capture.take(seen)

    def _read6(self) -> None:
        while True:
            try:
                data, src, hop_limit = recv6(self.sock, SNAPLEN)
            except (BlockingIOError, InterruptedError, OSError):
                return
            if len(data) < 20:
                continue
            capture = self.owner.get((src, int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")))
            if capture is not None:
                seen = parse6(data, src, hop_limit, IPPROTO_TCP)
                if seen is not None:
                    capture.take(seen)


def _canonical(address: str) -> str:
    """An IP address as the kernel's recvmsg gives it (IPv6 compressed, lower case)."""
    if ":" not in address:
        return address
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address.split("%")[0]))
    except OSError:
        return address


def _hub(loop: asyncio.AbstractEventLoop, family: int) -> _Hub:
    """The loop's hub of ``family``, made on first use; the loop's sock_connect
    is wrapped once (asyncio.open_connection and aiohttp both connect through
    it) so a connection made inside a captured measurement is claimed by its
    capture."""
    hubs = getattr(loop, "_vantage_capture_hubs", None)
    if hubs is None:
        hubs = loop._vantage_capture_hubs = {}
        original = loop.sock_connect

        async def sock_connect(sock, address):
            capture = _CURRENT.get()
            if capture is not None:
                try:
                    capture.claim(sock, address)
                except OSError:
                    pass
            return await original(sock, address)

        loop.sock_connect = sock_connect
    hub = hubs.get(family)
    if hub is None:
        hub = hubs[family] = _Hub(loop, family)
    return hub


def start(ctx: Any, addresses: list[str], port: int, clock: Any) -> "Capture | None":
    """Start capturing for a measurement (None when not asked for, or not
    possible: no privileges, or a family whose raw socket cannot be opened)."""
    if not (getattr(ctx, "packet", None) or {}).get("capture"):
        return None
    wanted = [_canonical(a) for a in addresses][:8]
    if not wanted or not _privileged():
        return None
    capture = Capture([], port, clock)
    loop = asyncio.get_running_loop()
    for family, group in ((socket.AF_INET, [a for a in wanted if ":" not in a]),
                          (socket.AF_INET6, [a for a in wanted if ":" in a])):
        if not group:
            continue
        try:
            hub = _hub(loop, family)
            hub.want(group)
        except OSError:
            continue  # e.g. no IPv6 in this kernel: that family goes uncaptured
        capture.hubs[family] = hub
        capture.addresses += group
    if not capture.hubs:
        return None
    capture.token = _CURRENT.set(capture)
    return capture


def _kind(p) -> str:
    if p.flags & RST:
        return "rst"
    if p.flags & SYN:
        return "syn_ack"
    if p.flags & FIN:
        return "fin"
    return "data"


async def _echo_ttl(ip: str, clock: Any) -> tuple[int, int | None] | None:
    """(IP TTL, IP ID) of the server's answer to one ICMP echo (IPv6: (hop
    limit, None) of its ICMPv6 echo reply), or None."""
    ident = int.from_bytes(os.urandom(2), "big")
    payload = b"vantage!"
    v6 = ":" in ip
    prog = Program(128)
    if v6:
        # The kernel fills in an ICMPv6 checksum (it covers a pseudo-header).
        packet = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + payload
        prog.op(LD_B_ABS, 0).op(JEQ_K, 129, 0, "drop").op(LD_H_ABS, 4).op(JEQ_K, ident, "accept", "drop")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, IPPROTO_ICMPV6)
        listener = Listener(IPPROTO_ICMPV6, prog, clock, max_packets=2, family=socket.AF_INET6)
    else:
        packet = struct.pack("!BBHHH", 8, 0, _checksum(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload), ident, 1) + payload
        prog.op(LD_W_ABS, 12).op(JEQ_K, _ip_int(ip), 0, "drop").op(LDX_B_MSH, 0).op(LD_B_IND, 0).op(JEQ_K, 0, 0, "drop")
        prog.op(LD_H_IND, 4).op(JEQ_K, ident, "accept", "drop")
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ICMP)
        listener = Listener(IPPROTO_ICMP, prog, clock, max_packets=2)
    try:
        with listener as replies:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_sendto(sock, packet, (ip, 0))
            for _ in range(int(ECHO_TIMEOUT / 0.05)):
                for reply in replies.packets:
                    if reply.src == ip:
                        return reply.ip_ttl, reply.ip_id
                await asyncio.sleep(0.05)
    except OSError:
        return None
    finally:
        sock.close()
    return None


def _flow_name(p) -> str:
    return f"[{p.src}]:{p.sport}>{p.dport}" if ":" in p.src else f"{p.src}:{p.sport}>{p.dport}"


async def stop(capture: "Capture | None", keys: dict[str, Any], clock: Any = None) -> None:
    """End the capture; its rows, each with its baseline and reading, go to
    ``keys["x_packets"]``: every RST, every FIN or response that is not the
    server's own (or cannot be compared), and the first SYN-ACK of each server
    (the baseline); the server's own FINs are counted in ``x_capture_genuine_fins``."""
    if capture is None:
        return
    abandon(capture)
    flows: dict[str, list] = {}
    for p in capture.packets:
        flows.setdefault(_flow_name(p), []).append(p)
    by_server: dict[str, Any] = {}
    for packets in flows.values():
        for p in packets:
            if p.flags & SYN and p.src not in by_server:
                by_server[p.src] = (p.ip_ttl, p.ip_id)
    # Servers that only ever answered with a RST: one echo each, all at once
    # (at most MAX_ECHOES, so a measurement waits ECHO_TIMEOUT at most for them).
    refused = list(dict.fromkeys(packets[0].src for packets in flows.values()
                                 if packets[0].src not in by_server and any(p.flags & RST for p in packets)))
    if refused:
        refused = refused[:MAX_ECHOES]
        answers = await asyncio.gather(*(_echo_ttl(ip, clock) for ip in refused))
        keys["x_capture_echo"] = len(refused)
        by_server.update({ip: answer for ip, answer in zip(refused, answers) if answer is not None})
    rows = keys.setdefault("x_packets", [])
    genuine_fins = 0
    shown: set[str] = set()  # servers whose SYN-ACK is stored
    for flow, packets in flows.items():
        syn_ack = next(((p.ip_ttl, p.ip_id) for p in packets if p.flags & SYN), None)
        baseline = syn_ack or by_server.get(packets[0].src)
        for p in packets:
            kind = _kind(p)
            injected = None
            if baseline is not None and kind != "syn_ack":
                injected = p.ip_ttl != baseline[0]
            if kind == "syn_ack":
                if p.src in shown:
                    continue
                shown.add(p.src)
            elif kind != "rst" and injected is False:
                genuine_fins += 1
                continue
            rows.append({
                "transaction_id": None, "kind": kind, "flow": flow, "src": p.src, "sport": p.sport, "dport": p.dport,
                "proto": p.proto, "ip_ttl": p.ip_ttl, "ip_id": p.ip_id, "tcp_flags": p.flag_text or None,
                # IPv6: + the fixed header, which raw sockets do not hand over
                "length": len(p.raw) + (40 if ":" in p.src else 0), "t": p.t,
                "baseline_ttl": baseline[0] if baseline else None,
                "baseline_ip_id": baseline[1] if baseline else None, "injected": injected,
            })
    if genuine_fins:
        keys["x_capture_genuine_fins"] = genuine_fins
    if capture.dropped:
        keys["x_capture_dropped"] = capture.dropped


def abandon(capture: "Capture | None") -> None:
    """Stop capturing (a measurement cut short keeps nothing)."""
    if capture is not None:
        for hub in capture.hubs.values():
            hub.release(capture)
        capture.hubs = {}
        if capture.token is None:
            return
        try:
            _CURRENT.reset(capture.token)
        except (ValueError, RuntimeError):  # reset from another context: just forget it
            _CURRENT.set(None)
        capture.token = None
