"""Packet-level plumbing for the packet probes (dns_injection, traceroute,
capture): privileges, raw IPv4 and IPv6 receive sockets with a per-flow BPF
filter attached in the kernel, header parsing (struct, no scapy dissection),
and OONI's df-003 packet entries.

No libpcap: the filters are classic BPF programs assembled here (a handful of
instructions each), attached with SO_ATTACH_FILTER to a raw socket, so the
kernel hands us only the packets of one flow, clipped to ``snaplen`` bytes.
A raw IPv4 socket sees every incoming packet of its protocol from the IP
header on (outgoing packets never), which is where the filters look. A raw
IPv6 socket gets the packet from the transport header on: its filter reads
the source address relative to the network header (``SKF_NET_OFF``), and the
hop limit arrives as ancillary data (``IPV6_RECVHOPLIMIT``). IPv6 has no IP
ID: ``Seen.ip_id`` is None there.

Reading an arriving packet's IP TTL and IP ID needs a raw socket, hence root
or CAP_NET_RAW; ``require_privileges`` says so in one line.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from core.errors import VantageError

SO_ATTACH_FILTER = 26
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
SNAPLEN = 1500

NO_PRIVILEGES = ("this test sends and reads raw packets (IP TTL, IP ID, ICMP): run it as root "
                 "or give Python CAP_NET_RAW (sudo setcap cap_net_raw+ep $(readlink -f $(which python3)))")


class PrivilegeError(VantageError):
    """The packet probes cannot open raw sockets."""


def have_privileges() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ICMP).close()
        return True
    except (PermissionError, OSError):
        return False


def require_privileges() -> None:
    if not have_privileges():
        raise PrivilegeError(NO_PRIVILEGES)


def setting(ctx: Any, name: str, default: Any = None) -> Any:
    """A packet probe's setting from ``ctx.packet`` (target, control_domain, runs, pause, window)."""
    value = (getattr(ctx, "packet", None) or {}).get(name)
    return default if value is None else value


# Callables ``(test_name, input, test_keys)`` told of each finished packet
# measurement: how `vantage run ... --json` prints one line per input.
LISTENERS: list[Any] = []


def report(test_name: str, url: str, keys: dict[str, Any]) -> None:
    for listener in list(LISTENERS):
        listener(test_name, url, keys)


# --- classic BPF -------------------------------------------------------------------

LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_H_IND, LD_B_IND = 0x48, 0x50
LDX_B_MSH = 0xB1
JA, JEQ_K, JSET_K = 0x05, 0x15, 0x45
RET_K = 0x06
SKF_NET_OFF = (-0x100000) & 0xFFFFFFFF  # loads relative to the network header (IPv6 raw sockets start after it)
IPPROTO_ICMPV6 = 58


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def _ip_int(address: str) -> int:
    return struct.unpack("!I", socket.inet_aton(address))[0]


class Program:
    """A classic BPF program built with symbolic jump targets: ``"accept"``,
    ``"drop"`` and labels placed with ``label`` (an unconditional ``JA`` takes
    its target in ``k``, which reaches any distance; conditional jumps reach 255)."""

    def __init__(self, snaplen: int = SNAPLEN):
        self.code: list[tuple[int, Any, Any, Any]] = []
        self.labels: dict[str, int] = {}
        self.snaplen = snaplen

    def op(self, code: int, k: Any = 0, jt: Any = 0, jf: Any = 0) -> "Program":
        self.code.append((code, jt, jf, k))
        return self

    def label(self, name: str) -> "Program":
        self.labels[name] = len(self.code)
        return self

    def assemble(self) -> list[tuple[int, int, int, int]]:
        body = len(self.code)
        targets = {**self.labels, "accept": body, "drop": body + 1}
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            resolve = lambda j: (targets[j] - i - 1) if isinstance(j, str) else j  # noqa: E731
            out.append((code, resolve(jt), resolve(jf), resolve(k) if code == JA else k))
        out.append((RET_K, 0, 0, self.snaplen))
        out.append((RET_K, 0, 0, 0))
        return out


def flow_program(remote_ips: list[str], remote_port: int | None, local_port: int | list[int] | None, *,
                 flags: int = 0, snaplen: int = SNAPLEN) -> Program:
    """TCP/UDP packets from one of ``remote_ips`` (from ``remote_port``, to
    ``local_port`` — or one of a list of them, none matching an empty list —
    when given; with ``flags``, only TCP segments carrying one of them)."""
    p = Program(snaplen)
    if isinstance(local_port, list) and not local_port:
        return p.op(RET_K, 0)  # no flow yet: nothing
    p.op(LD_W_ABS, 12)
    for n, ip in enumerate(remote_ips):
        last = n == len(remote_ips) - 1
        p.op(JEQ_K, _ip_int(ip), len(remote_ips) - n - 1, "drop" if last else 0)
    p.op(LDX_B_MSH, 0)  # X: the IPv4 header's length; the transport header is read relative to it
    return _transport_checks(p, remote_port, local_port, flags, LD_H_IND, LD_B_IND)


def _transport_checks(p: Program, remote_port: int | None, local_port: int | list[int] | None, flags: int,
                      load_half: int, load_byte: int) -> Program:
    """The ports and TCP flags of both families' programs; ``load_half`` and
    ``load_byte`` read the transport header (IPv4: relative to X, IPv6: at
    the start of the data)."""
    if remote_port is not None:
        p.op(load_half, 0).op(JEQ_K, remote_port, 0, "drop")
    if isinstance(local_port, list):
        p.op(load_half, 2)
        for n, lport in enumerate(local_port):
            last = n == len(local_port) - 1
            p.op(JEQ_K, lport, len(local_port) - n - 1, "drop" if last else 0)
    elif local_port is not None:
        p.op(load_half, 2).op(JEQ_K, local_port, 0, "drop")
    if flags:
        p.op(load_byte, 13).op(JSET_K, flags, "accept", "drop")
    return p


def flow_program6(remote_ips: list[str], remote_port: int | None, local_port: int | list[int] | None, *,
                  flags: int = 0, snaplen: int = SNAPLEN) -> Program:
    """``flow_program`` for a raw IPv6 socket: the data starts at the
    transport header, the source address is read at the network header's
    offset 8 (four words per address, each address's match a ``JA``)."""
    p = Program(snaplen)
    if (isinstance(local_port, list) and not local_port) or not remote_ips:
        return p.op(RET_K, 0)
    for n, ip in enumerate(remote_ips):
        words = struct.unpack("!4I", socket.inet_pton(socket.AF_INET6, ip))
        miss = f"addr{n + 1}" if n + 1 < len(remote_ips) else "drop"
        p.label(f"addr{n}")
        for w, word in enumerate(words):
            p.op(LD_W_ABS, (SKF_NET_OFF + 8 + 4 * w) & 0xFFFFFFFF).op(JEQ_K, word, 0, miss)
        p.op(JA, "ports")  # all four words matched
    p.label("ports")
    return _transport_checks(p, remote_port, local_port, flags, LD_H_ABS, LD_B_ABS)


def icmp_program(local_port: int, snaplen: int = 256) -> Program:
    """ICMP time-exceeded or destination-unreachable quoting a packet sent from
    ``local_port`` (the quoted header is assumed option-free, as ours are)."""
    p = Program(snaplen)
    p.op(LDX_B_MSH, 0)
    p.op(LD_B_IND, 0)
    p.op(JEQ_K, 11, 1, 0)
    p.op(JEQ_K, 3, 0, "drop")
    p.op(LD_H_IND, 28).op(JEQ_K, local_port, "accept", "drop")
    return p


def attach(sock: socket.socket, program: Program, *, drain: bool = True) -> None:
    insns = program.assemble()
    array = (_Insn * len(insns))(*[_Insn(c, jt, jf, k) for c, jt, jf, k in insns])
    prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Insn)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))
    sock.setblocking(False)
    # Whatever arrived before the first filter was attached is not ours.
    while drain:
        try:
            sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            break


# --- parsing ----------------------------------------------------------------------


@dataclass
class Seen:
    """One packet that arrived: the IP header fields we compare, and the transport's."""

    raw: bytes
    t: float                    # seconds since the probe's clock started
    src: str
    dst: str
    proto: int
    ip_ttl: int                 # IPv6: the hop limit
    ip_id: int | None           # IPv6: None (it has none)
    sport: int = 0
    dport: int = 0
    seq: int = 0
    ack: int = 0
    flags: int = 0
    payload: bytes = b""
    icmp_type: int | None = None
    icmp_code: int | None = None
    quoted: "Seen | None" = None  # the packet an ICMP error quotes

    @property
    def flag_text(self) -> str:
        return "".join(ch for bit, ch in ((SYN, "S"), (ACK, "A"), (FIN, "F"), (RST, "R"), (PSH, "P")) if self.flags & bit)


def tcp_header(body: bytes) -> tuple[int, int, int, int, int, int] | None:
    """The TCP header at the start of ``body``: sport, dport, seq, ack, flags (9 bits)
    and the data offset in bytes; None when ``body`` is shorter than 20 bytes.
    Also the lab's DPI parser (lab/dpi.py)."""
    if len(body) < 20:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack_from("!HHIIH", body)
    return sport, dport, seq, ack, off_flags & 0x1FF, (off_flags >> 12) * 4


def parse(raw: bytes, t: float = 0.0, *, quoted: bool = False) -> Seen | None:
    if len(raw) < 20 or raw[0] >> 4 != 4:
        return None
    ihl = (raw[0] & 0x0F) * 4
    ip_id = struct.unpack_from("!H", raw, 4)[0]
    ttl, proto = raw[8], raw[9]
    s = Seen(raw, t, socket.inet_ntoa(raw[12:16]), socket.inet_ntoa(raw[16:20]), proto, ttl, ip_id)
    body = raw[ihl:]
    tcp = tcp_header(body) if proto == IPPROTO_TCP else None
    if tcp is not None:
        s.sport, s.dport, s.seq, s.ack, s.flags, offset = tcp
        s.payload = body[offset:]
    elif proto == IPPROTO_TCP and quoted and len(body) >= 8:  # an ICMP error quotes the first 8 bytes at least
        s.sport, s.dport, s.seq = struct.unpack_from("!HHI", body)
    elif proto == IPPROTO_UDP and len(body) >= 8:
        s.sport, s.dport = struct.unpack_from("!HH", body)
        s.payload = body[8:]
    elif proto == IPPROTO_ICMP and len(body) >= 8:
        s.icmp_type, s.icmp_code = body[0], body[1]
        if s.icmp_type in (3, 11) and not quoted:
            s.quoted = parse(body[8:], t, quoted=True)
    return s


def parse6(data: bytes, src: str, hop_limit: int, proto: int, t: float = 0.0) -> Seen | None:
    """A packet read from a raw IPv6 socket: ``data`` starts at the transport
    header; the source and hop limit came with it (recvmsg). ``raw`` is the
    transport data (the IPv6 header is not handed to raw sockets)."""
    s = Seen(data, t, src, "", proto, hop_limit, None)
    if proto == IPPROTO_TCP:
        tcp = tcp_header(data)
        if tcp is None:
            return None
        s.sport, s.dport, s.seq, s.ack, s.flags, offset = tcp
        s.payload = data[offset:]
    elif proto == IPPROTO_UDP and len(data) >= 8:
        s.sport, s.dport = struct.unpack_from("!HH", data)
        s.payload = data[8:]
    elif proto == IPPROTO_ICMPV6 and len(data) >= 8:
        s.icmp_type, s.icmp_code = data[0], data[1]
    return s


_HOPLIMIT_SPACE = socket.CMSG_SPACE(4)


def open_raw6(proto: int) -> socket.socket:
    """A raw IPv6 socket of ``proto`` that is told each packet's hop limit."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def recv6(sock: socket.socket, size: int) -> tuple[bytes, str, int]:
    """(data, source address, hop limit) of one packet from ``open_raw6``'s socket."""
    data, ancillary, _, address = sock.recvmsg(size, _HOPLIMIT_SPACE)
    hop_limit = -1
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
            hop_limit = struct.unpack("i", value[:4])[0]
    return data, address[0], hop_limit


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def anonymised(raw: bytes, own: str | None, *, sent: bool) -> bytes:
    """df-003's privacy rule: our address becomes 127.0.0.1 (the source of sent
    packets, the destination of received ones, and the source of the packet
    an ICMP error quotes); the checksums are redone."""
    if len(raw) < 20 or own is None or raw[0] >> 4 != 4:
        return raw
    mine, home = socket.inet_aton(own), socket.inet_aton("127.0.0.1")
    ihl = (raw[0] & 0x0F) * 4
    out = bytearray(raw)
    at = 12 if sent else 16
    if out[at:at + 4] == mine:
        out[at:at + 4] = home
        out[10:12] = b"\0\0"
        out[10:12] = struct.pack("!H", _checksum(bytes(out[:ihl])))
    inner = ihl + 8
    if not sent and out[9] == IPPROTO_ICMP and len(out) >= inner + 20 and out[ihl] in (3, 11) \
            and out[inner + 12:inner + 16] == mine:
        inner_ihl = (out[inner] & 0x0F) * 4
        out[inner + 12:inner + 16] = home
        out[inner + 10:inner + 12] = b"\0\0"
        out[inner + 10:inner + 12] = struct.pack("!H", _checksum(bytes(out[inner:inner + inner_ihl])))
        icmp = out[ihl:]
        icmp[2:4] = b"\0\0"
        if len(icmp) % 2:
            icmp += b"\0"
        out[ihl + 2:ihl + 4] = struct.pack("!H", _checksum(bytes(icmp)))
    return bytes(out)


def summary(raw: bytes) -> str:
    """A one-line scapy summary (df-003's ``summary``); the bytes' length if scapy is missing."""
    try:
        from scapy.layers.inet import IP

        return IP(raw).summary()
    except Exception:  # scapy missing or a packet it cannot dissect
        return f"{len(raw)} bytes"


def packet_entry(raw: bytes, own: str | None = None, *, sent: bool = False, **extra: Any) -> dict[str, Any]:
    """A df-003 Packet: ``raw_packet`` (BinaryData) and ``summary``; our additions ``x_``."""
    data = anonymised(raw, own, sent=sent)
    return {"raw_packet": {"data": base64.b64encode(data).decode(), "format": "base64"}, "summary": summary(data), **extra}


# --- listening --------------------------------------------------------------------


@dataclass
class Listener:
    """A raw socket with a BPF program, read by the event loop; keeps at most
    ``max_packets`` packets and ``max_bytes`` bytes (a bounded capture).
    ``family`` AF_INET6: a raw IPv6 socket (``flow_program6``, ``parse6``)."""

    proto: int
    program: Program
    clock: Any = None
    max_packets: int = 64
    max_bytes: int = 64 * 1024
    max_per_flow: int | None = None  # packets kept per (source, source port, destination port)
    rcvbuf: int | None = 256 * 1024
    family: int = socket.AF_INET
    packets: list[Seen] = field(default_factory=list)
    _flows: dict = field(default_factory=dict)
    dropped: int = 0
    _bytes: int = 0
    _sock: socket.socket | None = None
    _event: asyncio.Event | None = None

    def __enter__(self) -> "Listener":
        if self.family == socket.AF_INET6:
            self._sock = open_raw6(self.proto)
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, self.proto)
        try:
            if self.rcvbuf:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            attach(self._sock, self.program)
            self._event = asyncio.Event()
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)
        except BaseException:
            self._sock.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            except Exception:  # the loop is closing: nothing to unregister
                pass
            self._sock.close()
            self._sock = None

    def now(self) -> float:
        return self.clock.now() if self.clock is not None else time.monotonic()

    def refilter(self, program: Program) -> None:
        """Replace the kernel filter (what was already received is kept)."""
        self.program = program
        if self._sock is not None:
            attach(self._sock, program, drain=False)

    def _read(self) -> None:
        while self._sock is not None:
            try:
                if self.family == socket.AF_INET6:
                    raw, src, hop_limit = recv6(self._sock, 65535)
                else:
                    raw = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.packets) >= self.max_packets or self._bytes + len(raw) > self.max_bytes:
                self.dropped += 1
                continue
            if self.family == socket.AF_INET6:
                seen = parse6(raw, src, hop_limit, self.proto, self.now())
            else:
                seen = parse(raw, self.now())
            if seen is None:
                continue
            if self.max_per_flow is not None:
                flow = (seen.src, seen.sport, seen.dport)
                if self._flows.get(flow, 0) >= self.max_per_flow:
                    self.dropped += 1
                    continue
                self._flows[flow] = self._flows.get(flow, 0) + 1
            self._bytes += len(raw)
            self.packets.append(seen)
            if self._event is not None:
                self._event.set()

    async def wait(self, seconds: float) -> None:
        """Listen for ``seconds`` (packets are collected meanwhile)."""
        await asyncio.sleep(seconds)


def local_address_towards(ip: str) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return s.getsockname()[0]
    except OSError:
        return None
