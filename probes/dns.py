"""DNS primitives: one lookup, one (or more) ``queries`` entries, never an exception.

Three engines, recorded in each entry's ``engine`` field:

- ``system``: getaddrinfo, what applications on the probe see (A and AAAA
  together, so ``query_type`` is ``ANY`` as in OONI's records);
- ``udp``: a query we build and send ourselves to an explicit resolver. We own
  the socket so that every reply is kept: on-path injectors race the genuine
  resolver, and a forged answer followed by the real one is the evidence;
- ``doh``: DNS over HTTPS (RFC 8484), usually the encrypted baseline.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from core.net import endpoint, parse_host_port

from . import failures
from .records import Clock, dns_answer, dns_query

DOH_MEDIA_TYPE = "application/dns-message"


def parse_server(server: str, default_port: int = 53) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"``, ``"v6"`` or ``"[v6]:port"`` -> (ip, port)."""
    return parse_host_port(server, default_port)


# --- system ---------------------------------------------------------------------


async def system_lookup(hostname: str, *, clock: Clock, txid: int, timeout: float) -> dict[str, Any]:
    """Resolve with getaddrinfo in the loop's executor. A thread blocked in
    getaddrinfo cannot be interrupted; on timeout we stop waiting for it."""
    loop = asyncio.get_running_loop()
    t0 = clock.now()
    answers: list[dict[str, Any]] = []
    failure: str | None = None
    try:
        infos = await asyncio.wait_for(
            loop.run_in_executor(None, socket.getaddrinfo, hostname, 443, socket.AF_UNSPEC, socket.SOCK_STREAM),
            timeout,
        )
        seen: set[str] = set()
        for family, _type, _proto, _canon, sockaddr in infos:
            ip = sockaddr[0]
            if ip in seen or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            seen.add(ip)
            answers.append(dns_answer("A" if family == socket.AF_INET else "AAAA", ip))
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


def _answers_of(response: dns.message.Message) -> list[dict[str, Any]]:
    """A, AAAA and CNAME records of the answer section (CNAMEs show where a
    censor redirected a name); other types are kept with a generic ``value``."""
    out: list[dict[str, Any]] = []
    for rrset in response.answer:
        rtype = dns.rdatatype.to_text(rrset.rdtype)
        for rdata in rrset:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                value = rdata.address
            elif rrset.rdtype == dns.rdatatype.CNAME:
                value = rdata.target.to_text(omit_final_dot=True)
            else:
                value = rdata.to_text()
            out.append(dns_answer(rtype, value, rrset.ttl))
    return out


def _response_failure(response: dns.message.Message, qtype: str) -> str | None:
    rcode = response.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return failures.DNS_NXDOMAIN
    if rcode == dns.rcode.REFUSED:
        return failures.DNS_REFUSED
    if rcode == dns.rcode.SERVFAIL:
        return failures.DNS_SERVFAIL
    if rcode != dns.rcode.NOERROR:
        return failures.classify(f"dns rcode {dns.rcode.to_text(rcode)}")
    wanted = dns.rdatatype.from_text(qtype)
    if not any(rrset.rdtype == wanted for rrset in response.answer):
        return failures.DNS_NO_ANSWER
    return None


def _entry_from_response(
    response: dns.message.Message, *, engine: str, resolver: str, hostname: str, qtype: str,
    t0: float, t: float, txid: int, index: int = 0,
) -> dict[str, Any]:
    return dns_query(
        engine=engine,
        resolver=resolver,
        hostname=hostname,
        query_type=qtype,
        answers=_answers_of(response),
        failure=_response_failure(response, qtype),
        rcode=dns.rcode.to_text(response.rcode()),
        t0=t0,
        t=t,
        transaction_id=txid,
        response_index=index,
    )


# --- UDP --------------------------------------------------------------------------


class _Collector(asyncio.DatagramProtocol):
    """Queues every datagram (and ICMP errors) for the lookup loop."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.queue: asyncio.Queue[tuple[float, bytes | None, Exception | None]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((self.clock.now(), data, None))

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait((self.clock.now(), None, exc))


async def udp_lookup(
    hostname: str, server: str, qtype: str = "A", *, clock: Clock, txid: int, timeout: float, linger: float = 1.0,
) -> list[dict[str, Any]]:
    """Send one query to ``server`` and record every reply to it.

    Receiving continues until ``linger`` seconds after the first reply (an
    injector's forged answer usually arrives first, the resolver's later), or
    until ``timeout`` when nothing arrives. Datagrams that are not replies to
    our query (wrong id or question, unparseable) are ignored: the socket is
    connected, so they can only come from the server's address anyway.
    """
    ip, port = parse_server(server)
    resolver = endpoint(ip, port)
    query = dns.message.make_query(hostname, qtype)
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
    try:
        transport.sendto(query.to_wire())
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                t, data, error = await asyncio.wait_for(protocol.queue.get(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                break
            if error is not None:
                # An ICMP error (port unreachable -> ECONNREFUSED) is itself an
                # answer from the network; before any reply it ends the lookup.
                if not entries:
                    return failed(failures.classify(error))
                continue
            try:
                response = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            if not query.is_response(response):
                continue
            entries.append(_entry_from_response(
                response, engine="udp", resolver=resolver, hostname=hostname, qtype=qtype,
                t0=t0, t=t, txid=txid, index=len(entries),
            ))
            if len(entries) == 1:
                deadline = loop.time() + linger
    finally:
        transport.close()
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
                body = await resp.read()
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
