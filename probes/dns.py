"""DNS primitives: one lookup, one (or more) ``queries`` entries, never an exception.

Three engines, recorded in each entry's ``engine`` field:

- ``system``: getaddrinfo, what applications on the probe see (A and AAAA
  together, so ``query_type`` is ``ANY`` as in OONI's records);
- ``udp``: a query we build and send ourselves to an explicit resolver. We own
  the socket so that every reply is kept: on-path injectors race the genuine
  resolver, and a forged answer followed by the real one is the evidence;
- ``doh``: DNS over HTTPS (RFC 8484), usually the encrypted baseline;
- ``tcp``: the same query over TCP, sent when a UDP reply has the TC bit set
  (RFC 7766, as every stub resolver does; musl's does not, and says "no
  network").

Hostile resolvers are bounded: at most ``MAX_RESPONSES`` replies kept per
query, ``MAX_ANSWERS`` records per reply, 64 KiB read from a DoH body.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import queue
import re
import socket
import struct
import threading
from typing import Any, Callable

import dns.asyncquery
import dns.entropy
import dns.exception
import dns.flags
import dns.ipv4
import dns.ipv6
import dns.message
import dns.rcode
import dns.rdatatype

from core.net import endpoint, parse_host_port

from . import failures
from .records import Clock, dns_answer, dns_query

DOH_MEDIA_TYPE = "application/dns-message"
MAX_RESPONSES = 16  # replies kept per UDP query (injection races need 2 or 3)
MAX_ANSWERS = 64  # records kept per reply
MAX_MESSAGE = 65535  # the largest DNS message (RFC 1035 over TCP, RFC 8484)


def parse_server(server: str, default_port: int = 53) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"``, ``"v6"`` or ``"[v6]:port"`` -> (ip, port)."""
    return parse_host_port(server, default_port)


# --- system ---------------------------------------------------------------------


class _DaemonThreads:
    """Daemon threads kept for the next call once idle (a thread a lookup
    costs ~0.1-0.5 ms of CPU to start; a run makes one lookup a URL or more),
    each leaving after ``IDLE_SECONDS`` without work. Never joined by anyone:
    a thread stuck in getaddrinfo is abandoned at exit, as before."""

    IDLE_SECONDS = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0

    def submit(self, job: Callable[[], Callable[[], None]]) -> None:
        """Run ``job`` in an idle thread (or a new one); what it returns is
        called once the thread counts as idle again."""
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1  # this job is that thread's
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name="vantage-getaddrinfo", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0 and self._jobs.empty():
                        self._idle -= 1
                        return
                continue  # a job was handed to this thread just now: take it
            deliver = job()
            with self._lock:  # idle before the caller hears back: its next lookup finds this thread
                self._idle += 1
            deliver()


_threads = _DaemonThreads()


def _forget_threads() -> None:
    """A forked child (the measuring process) has none of its parent's threads."""
    global _threads
    _threads = _DaemonThreads()


os.register_at_fork(after_in_child=_forget_threads)


async def in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread that nobody waits for at exit.

    getaddrinfo cannot be interrupted. In the loop's executor, a lookup hung
    on a dead resolver kept Ctrl-C waiting until glibc gave up (asyncio.run
    joins the default executor's threads, and so does interpreter exit): 15 s
    with no word. A daemon thread is abandoned instead; it ends by itself when
    getaddrinfo returns. Idle threads are reused (``_DaemonThreads``); a busy
    one is never waited for: each call gets a thread of its own."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # cancelled: the caller stopped waiting
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> Callable[[], None]:
        try:
            value, ok = fn(*args), True
        except BaseException as exc:  # handed to the caller, never lost in the thread
            value, ok = exc, False

        def hand_over() -> None:
            try:
                loop.call_soon_threadsafe(deliver, ok, value)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return hand_over

    _threads.submit(work)
    return await future


async def getaddrinfo(host: str, port: int | str | None, family: int = 0, type: int = 0, proto: int = 0,
                      flags: int = 0) -> list:
    """``socket.getaddrinfo`` without blocking the loop or the exit (see
    ``in_daemon_thread``)."""
    return await in_daemon_thread(socket.getaddrinfo, host, port, family, type, proto, flags)


async def system_lookup(hostname: str, *, clock: Clock, txid: int, timeout: float) -> dict[str, Any]:
    """Resolve with getaddrinfo in a daemon thread. A thread blocked in
    getaddrinfo cannot be interrupted; on timeout we stop waiting for it."""
    t0 = clock.now()
    answers: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        async with asyncio.timeout(timeout):  # (wait_for would add a task a lookup)
            infos = await getaddrinfo(hostname, 443, socket.AF_UNSPEC, socket.SOCK_STREAM)
        seen: set[str] = set()
        for family, _type, _proto, _canon, sockaddr in infos:
            ip = sockaddr[0]
            if ip in seen or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            seen.add(ip)
            answers.append(dns_answer("A" if family == socket.AF_INET else "AAAA", ip))
            if len(answers) >= MAX_ANSWERS:
                break
        if not answers:
            failure = failures.DNS_NO_ANSWER
    except Exception as exc:  # every network outcome becomes a record
        failure = failures.classify(exc)
    return dns_query(
        engine="system",
        resolver="",
        hostname=hostname,
        query_type="ANY",
        answers=answers,
        failure=failure,
        rcode=None,
        t0=t0,
        t=clock.now(),
        transaction_id=txid,
    )


# --- parsing responses -----------------------------------------------------------


def _answers_of(response: dns.message.Message | _Reply) -> list[dict[str, Any]]:
    """A, AAAA and CNAME records of the answer section (CNAMEs show where a
    censor redirected a name); other types are kept with a generic ``value``."""
    out: list[dict[str, Any]] = []
    if isinstance(response, _Reply):
        for rtype, ttl, values in response.rrsets:
            for value in values:
                out.append(dns_answer(_RTYPE_TEXT[rtype], value, ttl))
                if len(out) >= MAX_ANSWERS:
                    return out
        return out
    for rrset in response.answer:
        rtype = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and hasattr(rdata, "address"):
                value = rdata.address  # (an A of another class than IN is generic rdata: its text below)
            elif rrset.rdtype == dns.rdatatype.CNAME and hasattr(rdata, "target"):
                value = rdata.target.to_text(omit_final_dot=True)
            else:
                value = rdata.to_text()
            out.append(dns_answer(rtype, value, rrset.ttl))
            if len(out) >= MAX_ANSWERS:  # a flood of records in one reply
                return out
    return out


def _response_failure(response: dns.message.Message | _Reply, qtype: str) -> str | None:
    rcode = response.rcode if isinstance(response, _Reply) else response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return failures.DNS_NXDOMAIN
    if rcode == dns.rcode.REFUSED:
        return failures.DNS_REFUSED
    if rcode == dns.rcode.SERVFAIL:
        return failures.DNS_SERVFAIL
    if rcode != dns.rcode.NOERROR:
        return failures.classify(f"dns rcode {dns.rcode.to_text(rcode)}")
    wanted = dns.rdatatype.from_text(qtype)
    if isinstance(response, _Reply):
        present = any(rtype == wanted for rtype, _, _ in response.rrsets)
    else:
        present = any(rrset.rdtype == wanted for rrset in response.answer)
    return None if present else failures.DNS_NO_ANSWER


def _entry_from_response(
    response: dns.message.Message | _Reply, *, engine: str, resolver: str, hostname: str, qtype: str,
    t0: float, t: float, txid: int, index: int = 0,
) -> dict[str, Any]:
    rcode = response.rcode if isinstance(response, _Reply) else response.rcode()
    return dns_query(
        engine=engine,
        resolver=resolver,
        hostname=hostname,
        query_type=qtype,
        answers=_answers_of(response),
        failure=_response_failure(response, qtype),
        rcode=dns.rcode.to_text(rcode),
        t0=t0,
        t=t,
        transaction_id=txid,
        response_index=index,
    )


# --- the common case by hand ------------------------------------------------------
# dnspython builds and parses a message in pure Python: ~0.3 ms of CPU for a
# query and its reply, two or three of them a URL on each side (the probe, the
# helper). The plain case is built and read here: a query for an ASCII name,
# a reply with one question and A/AAAA/CNAME answers only. Anything else
# (EDNS, authority or additional records, truncation, escapes, a malformed or
# odd message) goes to dnspython as before. Same records either way:
# tests/test_dns_wire.py compares the two on replies of every shape.

_PLAIN_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")
_TEXT_LABEL = re.compile(rb"[A-Za-z0-9_-]+")
_QTYPES = {"A": 1, "AAAA": 28, "CNAME": 5}
_RTYPE_TEXT = {1: "A", 28: "AAAA", 5: "CNAME"}
_RD = 0x0100


class _Query:
    """A query as sent: its wire, id, question; ``message`` (dnspython's,
    parsed from the wire) only when a reply needs dnspython."""

    __slots__ = ("wire", "id", "qname", "qtype", "_message")

    def __init__(self, wire: bytes, qname: bytes | None = None, qtype: int | None = None,
                 message: dns.message.Message | None = None) -> None:
        self.wire = wire
        self.id = int.from_bytes(wire[:2], "big")
        self.qname = qname  # lowercased wire form; None: only dnspython reads the replies
        self.qtype = qtype
        self._message = message

    @property
    def message(self) -> dns.message.Message:
        if self._message is None:
            self._message = dns.message.from_wire(self.wire)
        return self._message


def make_query(hostname: str, qtype: str) -> _Query:
    """What ``dns.message.make_query(hostname, qtype).to_wire()`` sends (RD, a
    random id, no EDNS), built by hand for a plain ASCII name."""
    code = _QTYPES.get(qtype)
    if code is not None and len(hostname) <= 253 and _PLAIN_NAME.fullmatch(hostname):
        labels = hostname.rstrip(".").encode("ascii").split(b".")
        qname = b"".join(bytes((len(label),)) + label for label in labels) + b"\0"
        header = struct.pack("!HHHHHH", dns.entropy.random_16(), _RD, 1, 0, 0, 0)
        return _Query(header + qname + struct.pack("!HH", code, 1), qname.lower(), code)
    message = dns.message.make_query(hostname, qtype)
    return _Query(message.to_wire(), message=message)


class _Reply:
    """A plain reply read by hand: what the records need of it."""

    __slots__ = ("rcode", "rrsets")

    def __init__(self, rcode: int, rrsets: list[tuple[int, int, list[str]]]) -> None:
        self.rcode = rcode
        self.rrsets = rrsets  # (type, ttl, values) in dnspython's order: by first appearance


def _read_name(data: bytes, at: int) -> tuple[tuple[bytes, ...], int] | None:
    """The labels of the name at ``at`` and where it ends in place; None when
    dnspython could refuse it (a pointer not strictly backwards of the last
    one, a target overlapping the name, a long chain, a name over 255 bytes,
    an unknown label type): then dnspython reads the message."""
    labels: list[bytes] = []
    end = None
    size = 1
    hops = 0
    limit = at  # a pointer must point before this (dnspython's biggest_pointer)
    bound = len(data)  # reading stops before this (the previous segment's start)
    while True:
        if at >= bound:
            return None
        length = data[at]
        if length == 0:
            return tuple(labels), (at + 1 if end is None else end)
        if length >= 0xC0:
            if at + 1 >= bound or hops >= 8:
                return None
            target = ((length & 0x3F) << 8) | data[at + 1]
            if end is None:
                end = at + 2
            if target >= limit:
                return None
            bound, limit, at = limit, target, target  # dnspython: restrict_end(start), biggest_pointer
            hops += 1
            continue
        if length >= 0x40 or at + 1 + length > bound:
            return None
        size += length + 1
        if size > 255:
            return None
        labels.append(data[at + 1:at + 1 + length])
        at += 1 + length


def _fast_reply(data: bytes, query: _Query) -> _Reply | None:
    """The reply to ``query`` when it is plain (see above), else None (read
    it with dnspython, which also tells a stranger from a reply)."""
    if query.qname is None or len(data) < 12:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHHH", data)
    # A reply (QR) to our id, opcode QUERY, not truncated, one question, only answers.
    if ident != query.id or flags & 0xFA00 != 0x8000 or qdcount != 1 or nscount or arcount:
        return None
    end = 12 + len(query.qname)
    if data[12:end].lower() != query.qname or data[end:end + 4] != struct.pack("!HH", query.qtype, 1):
        return None
    at = end + 4
    rrsets: list[tuple[int, int, list[str]]] = []
    where: dict[tuple[bytes, int], int] = {}
    for _ in range(ancount):
        owner = _read_name(data, at)
        if owner is None:
            return None
        labels, at = owner
        if at + 10 > len(data):
            return None
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, at)
        at += 10
        rdata = data[at:at + rdlen]
        if rclass != 1 or len(rdata) != rdlen:
            return None
        if rtype == 1 and rdlen == 4:
            value = dns.ipv4.inet_ntoa(rdata)
        elif rtype == 28 and rdlen == 16:
            value = dns.ipv6.inet_ntoa(rdata)
        elif rtype == 5:
            target = _read_name(data, at)
            if target is None or target[1] != at + rdlen or not target[0]:
                return None
            if not all(_TEXT_LABEL.fullmatch(label) for label in target[0]):
                return None  # escapes: dnspython's text
            value = b".".join(target[0]).decode("ascii")
        else:
            return None
        at += rdlen
        if ttl > 0x7FFFFFFF:
            ttl = 0  # as dnspython reads it
        key = (tuple(label.lower() for label in labels), rtype)
        index = where.get(key)
        if index is None:
            where[key] = len(rrsets)
            rrsets.append((rtype, ttl, [value]))
            continue
        _, kept_ttl, values = rrsets[index]
        if rtype == 5:
            return None  # a second CNAME for one name: dnspython keeps the last
        rrsets[index] = (rtype, min(kept_ttl, ttl), values)
        if value not in values:
            values.append(value)
    if at != len(data):
        return None  # trailing bytes: dnspython's TrailingJunk
    return _Reply(flags & 0x000F, rrsets)


# --- UDP --------------------------------------------------------------------------


class _Collector(asyncio.DatagramProtocol):
    """Queues every datagram (and ICMP errors) for the lookup loop. A flood is
    dropped past ``limit`` queued datagrams: memory stays flat whatever the
    sender does."""

    def __init__(self, clock: Clock, limit: int = 256) -> None:
        self.clock = clock
        self.limit = limit
        self.dropped = 0
        self.queue: asyncio.Queue[tuple[float, bytes | None, Exception | None]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.queue.qsize() >= self.limit:
            self.dropped += 1
            return
        self.queue.put_nowait((self.clock.now(), data, None))

    def error_received(self, exc: Exception) -> None:
        if self.queue.qsize() < self.limit:
            self.queue.put_nowait((self.clock.now(), None, exc))


def _parse_reply(data: bytes, query: _Query) -> tuple[dns.message.Message | _Reply | None, bool]:
    """(the reply, whether it is truncated) for a datagram answering ``query``;
    (None, False) for anything else. A truncated reply may be cut mid-record:
    its header and question are enough to know it asks for TCP."""
    fast = _fast_reply(data, query)
    if fast is not None:
        return fast, False
    query = query.message
    try:
        response = dns.message.from_wire(data)
    except dns.exception.DNSException:
        try:
            response = dns.message.from_wire(data, question_only=True)
        except dns.exception.DNSException:
            return None, False
        if not response.flags & dns.flags.TC:
            return None, False
    if not query.is_response(response):
        return None, False
    return response, bool(response.flags & dns.flags.TC)


async def tcp_lookup(
    hostname: str, server: str, qtype: str = "A", *, clock: Clock, txid: int, timeout: float,
    query: dns.message.Message | None = None,
) -> dict[str, Any]:
    """One query over TCP (RFC 7766), as resolvers retry a truncated reply."""
    ip, port = parse_server(server)
    resolver = endpoint(ip, port)
    query = query or dns.message.make_query(hostname, qtype)
    t0 = clock.now()
    failure: str | None = None
    try:
        response = await dns.asyncquery.tcp(query, ip, timeout=timeout, port=port)
    except dns.exception.Timeout:
        failure = failures.GENERIC_TIMEOUT
    except dns.exception.DNSException as exc:
        failure = failures.classify(f"malformed dns response: {type(exc).__name__}")
    except Exception as exc:
        failure = failures.classify(exc)
    if failure is None:
        return _entry_from_response(response, engine="tcp", resolver=resolver, hostname=hostname, qtype=qtype,
                                    t0=t0, t=clock.now(), txid=txid)
    return dns_query(engine="tcp", resolver=resolver, hostname=hostname, query_type=qtype, answers=[],
                     failure=failure, rcode=None, t0=t0, t=clock.now(), transaction_id=txid)


async def udp_lookup(
    hostname: str, server: str, qtype: str = "A", *, clock: Clock, txid: int, timeout: float, linger: float = 1.0,
) -> list[dict[str, Any]]:
    """Send one query to ``server`` and record every reply to it.

    Receiving continues until ``linger`` seconds after the first reply (an
    injector's forged answer usually arrives first, the resolver's later), or
    until ``timeout`` when nothing arrives, or until ``MAX_RESPONSES`` replies.
    Datagrams that are not replies to our query (wrong id or question,
    unparseable) are ignored: the socket is connected, so they can only come
    from the server's address anyway.

    A reply with the TC bit set is recorded, and the query is sent again over
    TCP (an ``engine: tcp`` entry with the same transaction id, after the UDP
    ones), within the same ``timeout``.
    """
    ip, port = parse_server(server)
    resolver = endpoint(ip, port)
    query = make_query(hostname, qtype)
    loop = asyncio.get_running_loop()
    t0 = clock.now()

    def failed(failure: str) -> list[dict[str, Any]]:
        return [dns_query(engine="udp", resolver=resolver, hostname=hostname, query_type=qtype, answers=[],
                          failure=failure, rcode=None, t0=t0, t=clock.now(), transaction_id=txid)]

    try:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Collector(clock), remote_addr=(ip, port), family=family
        )
    except Exception as exc:
        return failed(failures.classify(exc))

    entries: list[dict[str, Any]] = []
    retry: asyncio.Task | None = None
    started = loop.time()
    try:
        transport.sendto(query.wire)
        deadline = started + timeout
        while len(entries) < MAX_RESPONSES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):  # (wait_for would add a task a datagram)
                    t, data, error = await protocol.queue.get()
            except (asyncio.TimeoutError, TimeoutError):
                break
            if error is not None:
                # An ICMP error (port unreachable -> ECONNREFUSED) is itself an
                # answer from the network; before any reply it ends the lookup.
                if not entries:
                    return failed(failures.classify(error))
                continue
            response, truncated = _parse_reply(data, query)
            if response is None:
                continue
            entries.append(_entry_from_response(
                response, engine="udp", resolver=resolver, hostname=hostname, qtype=qtype,
                t0=t0, t=t, txid=txid, index=len(entries),
            ))
            if truncated:
                entries[-1]["x_truncated"] = True  # the TC bit: "ask me over TCP"
            if truncated and retry is None:
                budget = max(0.1, started + timeout - loop.time())
                retry = asyncio.ensure_future(tcp_lookup(
                    hostname, server, qtype, clock=clock, txid=txid, timeout=budget, query=query.message))
            if len(entries) == 1:
                deadline = loop.time() + linger
        if retry is not None:
            entries.append(await retry)
    finally:
        transport.close()
        if retry is not None and not retry.done():
            retry.cancel()
    return entries or failed(failures.GENERIC_TIMEOUT)


# --- DNS over HTTPS ---------------------------------------------------------------


async def doh_lookup(
    hostname: str, url: str, qtype: str = "A", *, session: Any, clock: Clock, txid: int, timeout: float,
    method: str = "POST",
) -> dict[str, Any]:
    """One RFC 8484 exchange through ``session`` (an aiohttp.ClientSession).
    ``method`` "GET" sends the query base64url-encoded in ``?dns=``."""
    query = dns.message.make_query(hostname, qtype)
    query.id = 0  # RFC 8484 s4.1: id 0 keeps GET requests cacheable
    wire = query.to_wire()
    headers = {"accept": DOH_MEDIA_TYPE}
    t0 = clock.now()
    failure: str | None = None
    response: dns.message.Message | None = None
    try:
        async with asyncio.timeout(timeout):
            if method.upper() == "GET":
                encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
                request = session.get(url, params={"dns": encoded}, headers=headers)
            else:
                request = session.post(url, data=wire, headers={**headers, "content-type": DOH_MEDIA_TYPE})
            async with request as resp:
                body = await resp.content.read(MAX_MESSAGE + 1)  # a DNS message is at most 64 KiB
                if resp.status != 200:
                    failure = failures.HTTP_REQUEST_FAILED
                else:
                    response = dns.message.from_wire(body)
                    if not query.is_response(response):
                        failure = failures.classify("doh response does not match the query")
    except dns.exception.DNSException as exc:
        failure = failures.classify(f"malformed doh response: {type(exc).__name__}")
    except Exception as exc:
        failure = failures.classify(exc)
    t = clock.now()
    if response is not None and failure is None:
        return _entry_from_response(response, engine="doh", resolver=url, hostname=hostname, qtype=qtype,
                                    t0=t0, t=t, txid=txid)
    return dns_query(engine="doh", resolver=url, hostname=hostname, query_type=qtype, answers=[],
                     failure=failure, rcode=None, t0=t0, t=t, transaction_id=txid)


def first_addresses(queries: list[dict[str, Any]]) -> list[str]:
    """Unique A/AAAA addresses of first responses, in answer order. Late
    duplicates (``x_response_index`` >= 1) are evidence, not addresses to use."""
    out: list[str] = []
    for entry in queries:
        if entry.get("x_response_index", 0) != 0:
            continue
        for answer in entry.get("answers") or []:
            ip = answer.get("ipv4") or answer.get("ipv6")
            if ip and ip not in out:
                out.append(ip)
    return out
