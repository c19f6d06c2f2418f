"""Packet evidence during a web measurement (`vantage run web --capture`, root
or CAP_NET_RAW): a bounded capture of each connection's telling packets.

One raw TCP socket per measurement with a kernel BPF filter that names the
measurement's own connections: its server addresses and port, and the local
port of each connection, learnt as it connects (the event loop's
``sock_connect`` is wrapped: the socket is bound just before its SYN leaves
and its port added to the filter), so no other flow's packet is ever copied
to it. Only segments carrying SYN, FIN or RST pass (the SYN-ACK, the
resets, the closes — a forged block page ends with the forger's FIN),
clipped to ``SNAPLEN`` bytes; at most ``PER_FLOW`` packets per connection,
``MAX_FLOWS`` connections and ``MAX_PACKETS`` packets per measurement are
kept, so memory is bounded whatever the site sends. The bulk of a body is
never copied.
(Measured, docs/benchmarks.md: about 0.8 ms of CPU per measurement at 50
in flight. One run-wide socket whose program names every running flow
copies each packet once but costs 4 ms a measurement: the kernel re-checks
the whole program at every change.)

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

from .packets import (FIN, IPPROTO_ICMP, IPPROTO_TCP, JEQ_K, LD_B_IND, LD_H_IND, LD_W_ABS, LDX_B_MSH, PSH, RST, SYN, Listener,
                      Program, _checksum, _ip_int, flow_program, have_privileges)

SNAPLEN = 160
PER_FLOW = 12
MAX_PACKETS = 96
MAX_FLOWS = 32   # connections one measurement's filter names (retries, redirects to the same address)
ECHO_TIMEOUT = 1.0


_PRIVILEGED: list[bool] = []
_CURRENT: contextvars.ContextVar["Capture | None"] = contextvars.ContextVar("vantage_capture", default=None)


def _privileged() -> bool:
    if not _PRIVILEGED:
        _PRIVILEGED.append(have_privileges())
    return _PRIVILEGED[0]


class Capture:
    """One measurement's capture: its raw socket, whose kernel filter names
    exactly the measurement's connections (their local ports, learnt as each
    connects), so no other flow's packet is ever copied to it."""

    def __init__(self, addresses: list[str], port: int, clock: Any):
        self.addresses, self.port, self.local_ports = addresses, port, []
        self.listener = Listener(IPPROTO_TCP, self._program(), clock, max_packets=MAX_PACKETS,
                                 max_bytes=MAX_PACKETS * SNAPLEN, max_per_flow=PER_FLOW, rcvbuf=None)

    def _program(self):
        return flow_program(self.addresses, self.port, list(self.local_ports), flags=SYN | FIN | RST, snaplen=SNAPLEN)

    def claim(self, sock: socket.socket, address: Any) -> None:
        """Called just before ``sock`` connects to ``address``: bind it (so its
        port is known before the SYN leaves) and add its flow to the filter."""
        if sock.family != socket.AF_INET or not isinstance(address, tuple) or address[0] not in self.addresses \
                or address[1] != self.port or len(self.local_ports) >= MAX_FLOWS:
            return
        if sock.getsockname()[1] == 0:
            sock.bind(("", 0))
        self.local_ports.append(sock.getsockname()[1])
        self.listener.refilter(self._program())


def _install(loop: asyncio.AbstractEventLoop) -> None:
    """Wrap the loop's sock_connect (asyncio.open_connection and aiohttp both
    connect through it) so a connection made inside a captured measurement
    is claimed by its capture."""
    if getattr(loop, "_vantage_capture", False):
        return
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
    loop._vantage_capture = True


def start(ctx: Any, addresses: list[str], port: int, clock: Any) -> "Capture | None":
    """Start capturing for a measurement (None when not asked for, or not possible)."""
    if not (getattr(ctx, "packet", None) or {}).get("capture"):
        return None
    v4 = [a for a in addresses if ":" not in a][:8]
    if not v4 or not _privileged():
        return None
    capture = Capture(v4, port, clock)
    try:
        capture.listener.__enter__()
    except OSError:
        return None
    _install(asyncio.get_running_loop())
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
    listener = capture.listener
    flows: dict[str, list] = {}
    for p in listener.packets:
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
    if listener.dropped:
        keys["x_capture_dropped"] = listener.dropped


def abandon(capture: "Capture | None") -> None:
    """Stop capturing (a measurement cut short keeps nothing)."""
    if capture is not None:
        capture.listener.__exit__(None, None, None)
        try:
            _CURRENT.reset(capture.token)
        except (ValueError, RuntimeError):  # reset from another context: just forget it
            _CURRENT.set(None)
