"""Packet evidence during a web measurement (`vantage run web --capture`, root
or CAP_NET_RAW): a bounded capture of each connection's telling packets.

One raw TCP socket for the whole run, so the kernel copies a packet once
however many measurements are in flight. Its BPF program passes only SYN,
FIN and RST segments from the servers being measured, clipped to
``SNAPLEN`` bytes, and is re-attached only when a new server address
appears. Each connection a captured measurement makes is claimed as it
connects (the event loop's ``sock_connect`` is wrapped: the socket is bound
just before its SYN leaves, so its flow — server address, port, local port —
is known); a packet goes to the capture that claimed its flow, and one of no
claimed flow is dropped unread (four header bytes looked at). At most
``PER_FLOW`` packets per connection, ``MAX_FLOWS`` connections and
``MAX_PACKETS`` packets per measurement are kept, so memory is bounded
whatever the site sends; the bulk of a body never reaches user space.
(Cost, docs/benchmarks.md. Rejected: a socket per measurement with a
per-flow program, 0.8 ms of CPU a measurement, as the kernel copies every
packet to every raw socket before filtering; a run-wide program naming
every flow, 4 ms, in re-attaches.)

When the capture ends, each kept packet is compared with the server's own
packet on that connection, its SYN-ACK (IP TTL and IP ID): a RST or FIN or
response whose TTL differs came from a device nearer (or farther) than the
server — injected. A connection that never got a SYN-ACK (refused: a RST
answered the SYN) borrows another connection's SYN-ACK to the same server,
else one ICMP echo to the server gives its TTL. Rows go to the ``packets``
table (``x_packets``); analysis/sql/35_packets.sql reads them.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import struct
from typing import Any

from .packets import (FIN, IPPROTO_ICMP, IPPROTO_TCP, JEQ_K, LD_B_IND, LD_H_IND, LD_W_ABS, LDX_B_MSH, RST, SYN, Listener,
                      Program, _checksum, _ip_int, attach, flow_program, have_privileges, parse)

SNAPLEN = 160
PER_FLOW = 12
MAX_PACKETS = 96
MAX_ADDRESSES = 250  # servers the run-wide program names at once (jumps reach 255 instructions)
MAX_FLOWS = 32   # connections one measurement's filter names (retries, redirects to the same address)
ECHO_TIMEOUT = 1.0


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
        self.hub: "_Hub | None" = None
        self.token = None

    def claim(self, sock: socket.socket, address: Any) -> None:
        """Called just before ``sock`` connects to ``address``: bind it (so its
        port is known before the SYN leaves) and make the flow this capture's."""
        if sock.family != socket.AF_INET or not isinstance(address, tuple) or address[0] not in self.addresses \
                or address[1] != self.port or len(self.flows) >= MAX_FLOWS or self.hub is None:
            return
        if sock.getsockname()[1] == 0:
            sock.bind(("", 0))
        flow = (address[0], address[1], sock.getsockname()[1])
        self.flows.append(flow)
        self.hub.owner[flow] = self

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
    """The run's one capture socket: the kernel copies a packet once however
    many measurements run. Its BPF program passes SYN, FIN and RST segments
    from the servers being measured (re-attached only when a new address
    appears); each packet goes to the capture that claimed its flow, and a
    packet of no claimed flow is dropped unread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.owner: dict[tuple[str, int, int], Capture] = {}
        self.active: dict[str, int] = {}   # address -> running captures measuring it
        self.filtered: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_TCP)
        attach(self.sock, flow_program([], None, []))
        loop.add_reader(self.sock.fileno(), self._read)

    def want(self, addresses: list[str]) -> None:
        for a in addresses:
            self.active[a] = self.active.get(a, 0) + 1
        if any(a not in self.filtered for a in addresses):
            self.filtered = [a for a in self.active][:MAX_ADDRESSES]
            attach(self.sock, flow_program(self.filtered, None, None, flags=SYN | FIN | RST, snaplen=SNAPLEN), drain=False)

    def release(self, capture: Capture) -> None:
        for flow in capture.flows:
            if self.owner.get(flow) is capture:
                del self.owner[flow]
        for a in capture.addresses:
            left = self.active.get(a, 0) - 1
            if left > 0:
                self.active[a] = left
            else:
                self.active.pop(a, None)  # stays in the program until the next change

    def _read(self) -> None:
        while True:
            try:
                raw = self.sock.recv(65535)
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


def _hub(loop: asyncio.AbstractEventLoop) -> _Hub:
    """The loop's hub, made on first use; the loop's sock_connect is wrapped
    then (asyncio.open_connection and aiohttp both connect through it) so a
    connection made inside a captured measurement is claimed by its capture."""
    hub = getattr(loop, "_vantage_capture_hub", None)
    if hub is not None:
        return hub
    hub = _Hub(loop)
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
    loop._vantage_capture_hub = hub
    return hub


def start(ctx: Any, addresses: list[str], port: int, clock: Any) -> "Capture | None":
    """Start capturing for a measurement (None when not asked for, or not possible)."""
    if not (getattr(ctx, "packet", None) or {}).get("capture"):
        return None
    v4 = [a for a in addresses if ":" not in a][:8]
    if not v4 or not _privileged():
        return None
    capture = Capture(v4, port, clock)
    try:
        hub = _hub(asyncio.get_running_loop())
        hub.want(v4)
    except OSError:
        return None
    capture.hub = hub
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


async def _echo_ttl(ip: str, clock: Any) -> tuple[int, int] | None:
    """(IP TTL, IP ID) of the server's answer to one ICMP echo, or None."""
    ident = int.from_bytes(os.urandom(2), "big")
    payload = b"vantage!"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload), ident, 1) + payload

    prog = Program(128)
    prog.op(LD_W_ABS, 12).op(JEQ_K, _ip_int(ip), 0, "drop").op(LDX_B_MSH, 0).op(LD_B_IND, 0).op(JEQ_K, 0, 0, "drop")
    prog.op(LD_H_IND, 4).op(JEQ_K, ident, "accept", "drop")
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ICMP)
    try:
        with Listener(IPPROTO_ICMP, prog, clock, max_packets=2) as replies:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_sendto(sock, packet, (ip, 0))
            for _ in range(int(ECHO_TIMEOUT / 0.05)):
                if replies.packets:
                    return replies.packets[0].ip_ttl, replies.packets[0].ip_id
                await asyncio.sleep(0.05)
    except OSError:
        return None
    finally:
        sock.close()
    return None


async def stop(capture: "Capture | None", keys: dict[str, Any], clock: Any = None) -> None:
    """End the capture; its rows, each with its baseline and reading, go to ``keys["x_packets"]``."""
    if capture is None:
        return
    abandon(capture)
    flows: dict[str, list] = {}
    for p in capture.packets:
        flows.setdefault(f"{p.src}:{p.sport}>{p.dport}", []).append(p)
    by_server: dict[str, Any] = {}
    for packets in flows.values():
        for p in packets:
            if p.flags & SYN and p.src not in by_server:
                by_server[p.src] = (p.ip_ttl, p.ip_id)
    for flow, packets in flows.items():
        syn_ack = next(((p.ip_ttl, p.ip_id) for p in packets if p.flags & SYN), None)
        baseline = syn_ack or by_server.get(packets[0].src)
        if baseline is None and any(p.flags & RST for p in packets):
            baseline = await _echo_ttl(packets[0].src, clock)
            keys["x_capture_echo"] = keys.get("x_capture_echo", 0) + 1
            if baseline is not None:
                by_server[packets[0].src] = baseline
        for p in packets:
            kind = _kind(p)
            injected = None
            if baseline is not None and kind != "syn_ack":
                injected = p.ip_ttl != baseline[0]
            keys.setdefault("x_packets", []).append({
                "transaction_id": None, "kind": kind, "flow": flow, "src": p.src, "sport": p.sport, "dport": p.dport,
                "proto": p.proto, "ip_ttl": p.ip_ttl, "ip_id": p.ip_id, "tcp_flags": p.flag_text or None,
                "length": len(p.raw), "t": p.t, "baseline_ttl": baseline[0] if baseline else None,
                "baseline_ip_id": baseline[1] if baseline else None, "injected": injected,
            })
    if capture.dropped:
        keys["x_capture_dropped"] = capture.dropped


def abandon(capture: "Capture | None") -> None:
    """Stop capturing (a measurement cut short keeps nothing)."""
    if capture is not None:
        if capture.hub is not None:
            capture.hub.release(capture)
            capture.hub = None
        try:
            _CURRENT.reset(capture.token)
        except (ValueError, RuntimeError):  # reset from another context: just forget it
            _CURRENT.set(None)
