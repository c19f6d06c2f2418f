"""HTTP primitive: fetch a URL like a browser would, one ``requests`` entry per hop.

Choices that matter for measurement:

- Redirects are followed here, one hop at a time, so each hop (often the
  interesting one: a censor's 302 to a blockpage) is its own entry with
  ``x_redirect_index``; a loop ends with ``http_too_many_redirects``.
- ``pinned`` sends the request to the address the probe measured (a custom
  resolver), so HTTP is attributed to the same IP as the TCP/TLS steps.
- Bodies are read raw (``auto_decompress=False``) and decompressed here with
  ``max_length``: a gzip bomb never costs more memory than the body cap.
- One total deadline per hop (``timeouts.http``): a server that drips one
  byte at a time cannot keep a read-timeout alive forever. Bytes received
  before the deadline are kept, as ``bytes_received`` network events (the
  raw material of throttling analysis).
- Every entry is bounded in bytes, whatever the server sends: the body
  (``max_body``; 64 KiB for a redirect's), the bytes read off the wire
  (``WIRE_FACTOR`` times the body cap: a compressed stream that decodes to
  nothing ends there), the headers stored (``MAX_HEADER_BYTES``) and the
  network events (64 per hop, merged past that; see records.EventSampler).
- Redirects never lead into the volunteer's own network: a target whose
  address (its literal, or every address its name resolves to) is loopback,
  link-local, private or otherwise not public is recorded with
  ``address_refused`` and not fetched, unless ``allow`` lists it (the lab's
  public ranges) or it is the address the input URL itself was fetched from.
  The hop then connects only to the addresses that were checked.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
import socket
import ssl
import zlib
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from core.net import REDIRECT_CODES, REQUEST_HEADERS, Policy, canonical, endpoint, parse_ip

from . import dns, failures
from .records import Clock, EventSampler, Transactions, body_field, network_event, title_bytes
from .timeouts import Timeouts
from .tls import make_context

MAX_BODY = 512 * 1024
MAX_REDIRECT_BODY = 64 * 1024  # body kept of a redirect response
WIRE_FACTOR = 4  # bytes read per response: at most this many times the body cap
MAX_HEADER_BYTES = 32 * 1024  # names and values stored per response (aiohttp admits 128 x 8 KiB)

_CHARSET = re.compile(r"charset=[\"']?([\w.:-]+)", re.IGNORECASE)


def extract_title(body: bytes, content_type: str | None = None) -> str | None:
    """The page's <title>, unescaped and with whitespace collapsed."""
    raw = title_bytes(body[:MAX_BODY])
    if raw is None:
        return None
    charset = "utf-8"
    found = _CHARSET.search(content_type or "")
    if found:
        charset = found.group(1)
    try:
        text = raw.decode(charset, "replace")
    except LookupError:  # a charset name Python does not know
        text = raw.decode("utf-8", "replace")
    return " ".join(html.unescape(text).split())[:256]


class _Decoder:
    """Undoes Content-Encoding incrementally, never producing more than asked."""

    def __init__(self, encoding: str | None) -> None:
        self.encoding = (encoding or "").strip().lower()
        self._z: Any = None
        if self.encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def decode(self, data: bytes, limit: int) -> bytes:
        """At most ``limit`` decoded bytes from ``data`` (input beyond what
        that needs is dropped: the caller stops reading once it has ``limit``)."""
        if self.encoding == "deflate" and self._z is None:
            # RFC 9110 "deflate" is zlib-wrapped, but some servers send raw deflate.
            zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._z = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        if self._z is None:  # identity, or an encoding we did not ask for: keep the bytes as sent
            return data[:limit]
        return self._z.decompress(data, limit)


class _PinnedResolver(AbstractResolver):
    """Resolves pinned names to their addresses (the measured one, or those a
    redirect target was checked with); others via getaddrinfo."""

    def __init__(self, pinned: dict[str, str]) -> None:
        self._pinned: dict[str, list[str]] = {}
        for name, ip in pinned.items():
            self.pin(name, [ip])

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    def pin(self, name: str, ips: list[str]) -> None:
        self._pinned[self._key(name)] = list(ips)

    def pinned(self, name: str) -> list[str] | None:
        return self._pinned.get(self._key(name))

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        ips = self.pinned(host)
        if ips is None:
            infos = await dns.getaddrinfo(host, port, family, socket.SOCK_STREAM)
            return [ResolveResult(hostname=host, host=sockaddr[0], port=port, family=fam, proto=proto,
                                  flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                    for fam, _type, proto, _canon, sockaddr in infos]
        return [ResolveResult(
            hostname=host, host=ip, port=port, family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
            proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        ) for ip in ips]

    async def close(self) -> None:
        pass


class _RecordingConnector(aiohttp.TCPConnector):
    """Remembers the peer of the last connection made: the ``x_address`` of a hop
    (connections are never reused, so "last" is "this hop's")."""

    peer: str | None = None
    peer_ip: str | None = None

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        transport = connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if peer:
            self.peer = endpoint(peer[0], peer[1])
            self.peer_ip = peer[0]
        return connection


def _stored_headers(headers: Any) -> tuple[list[list[str]], bool]:
    """The response's headers in order, up to MAX_HEADER_BYTES of names and
    values; True when some were left out."""
    kept: list[list[str]] = []
    size = 0
    for name, value in headers.items():
        size += len(name) + len(value)
        if size > MAX_HEADER_BYTES:
            return kept, True
        kept.append([name, value])
    return kept, False


def _first_values(headers: list[list[str]]) -> dict[str, str]:
    """OONI's ``headers`` map holds one value per name; ``headers_list`` has all."""
    out: dict[str, str] = {}
    for name, value in headers:
        out.setdefault(name, value)
    return out


class _Guard:
    """Checks redirect targets against the policy before any connection.

    ``origin``: the address the input URL was fetched from (the volunteer
    chose it), allowed again for the rest of the chain."""

    def __init__(self, policy: Policy, resolver: _PinnedResolver) -> None:
        self.policy = policy
        self.resolver = resolver
        self.origin: str | None = None

    def _allowed(self, ip: str) -> bool:
        address = parse_ip(ip)
        if address is None:
            return False
        if self.origin is not None and str(canonical(address)) == self.origin:
            return True
        return self.policy.check_ip(address).allowed

    async def check(self, url: URL) -> str | None:
        """None when ``url`` may be fetched (its host is then pinned to the
        addresses checked), else the failure to record."""
        host = url.raw_host or ""
        ips = self.resolver.pinned(host)
        if ips is None:
            literal = parse_ip(host)
            if literal is not None:
                ips = [str(canonical(literal))]
            else:
                infos = await dns.getaddrinfo(host, url.port or 0, socket.AF_UNSPEC, socket.SOCK_STREAM)
                ips = list(dict.fromkeys(sockaddr[0] for _f, _t, _p, _c, sockaddr in infos))
        if not ips:
            return failures.DNS_NO_ANSWER
        if not all(self._allowed(ip) for ip in ips):
            return failures.ADDRESS_REFUSED  # one address into the local network is one too many
        self.resolver.pin(host, ips)
        return None


def _next_url(current: URL, location: str) -> URL | None:
    """Where a redirect points, or None when it cannot be followed."""
    try:
        target = current.join(URL(location.strip()))
    except (ValueError, TypeError):
        return None
    if target.scheme not in ("http", "https") or not target.host:
        return None
    return target


async def _hop(
    session: aiohttp.ClientSession, connector: _RecordingConnector, url: URL, index: int, *,
    clock: Clock, txid: int, timeouts: Timeouts, max_body: int, headers: dict[str, str], events: list,
    guard: _Guard | None = None,
) -> tuple[dict[str, Any], URL | None]:
    """One GET; returns its entry and the redirect target to follow, if any.
    ``guard``: the check a redirect target must pass before it is fetched."""
    connector.peer = connector.peer_ip = None
    t0 = clock.now()
    response: dict[str, Any] = {}
    body = bytearray()
    truncated = False
    follow: URL | None = None
    failure: str | None = None
    content_type: str | None = None
    sampler = EventSampler()
    try:
        async with asyncio.timeout(timeouts.http):
            if guard is not None:
                failure = await guard.check(url)
            if failure is None:
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    content_type = resp.headers.get("Content-Type")
                    kept, headers_cut = _stored_headers(resp.headers)
                    response = {
                        "code": resp.status,
                        "headers": _first_values(kept),
                        "headers_list": kept,
                        "body": None,
                        "body_is_truncated": False,
                    }
                    if headers_cut:
                        response["x_headers_truncated"] = True
                    limit = max_body
                    if resp.status in REDIRECT_CODES and "Location" in resp.headers:
                        follow = _next_url(url, resp.headers["Location"])
                        if follow is None:
                            failure = failures.HTTP_INVALID_REDIRECT
                        limit = min(max_body, MAX_REDIRECT_BODY)
                    wire_limit = WIRE_FACTOR * max(limit, 16 * 1024)
                    wire = 0
                    decoder = _Decoder(resp.headers.get("Content-Encoding"))
                    while True:
                        chunk = await resp.content.readany()
                        if not chunk:
                            break
                        wire += len(chunk)
                        sampler.add(network_event(
                            operation="bytes_received", t=clock.now(), transaction_id=txid,
                            num_bytes=len(chunk), address=connector.peer,
                        ))
                        # One byte past the cap tells "exactly limit" from "more".
                        body += decoder.decode(chunk, limit - len(body) + 1)
                        if len(body) > limit:
                            del body[limit:]
                            truncated = True
                            break
                        if wire >= wire_limit:  # e.g. a compressed stream that decodes to nothing, forever
                            truncated = True
                            break
    except zlib.error:
        failure = failures.HTTP_REQUEST_FAILED  # a body that does not match its Content-Encoding
    except Exception as exc:  # every network outcome is recorded, not raised
        failure = failures.classify(exc)
    finally:
        events.extend(sampler.events)  # also when the measurement's deadline cancels us
    data = bytes(body)
    if response:
        response["body"] = body_field(data)
        response["body_is_truncated"] = truncated
    entry = {
        "request": {"url": str(url), "method": "GET", "headers": dict(headers)},
        "response": response,
        "failure": failure,
        "t0": t0,
        "t": clock.now(),
        "transaction_id": txid,
        "x_redirect_index": index,
        "x_address": connector.peer,
        "x_body_length": len(data) if response else None,
        "x_body_sha256": hashlib.sha256(data).hexdigest() if response else None,
        "x_title": extract_title(data, content_type) if response else None,
    }
    return entry, (follow if failure is None else None)


async def fetch(
    url: str, *, clock: Clock, transactions: Transactions, timeouts: Timeouts,
    context: ssl.SSLContext | None = None, pinned: dict[str, str] | None = None,
    max_redirects: int = 10, max_body: int = MAX_BODY, headers: dict[str, str] | None = None,
    events: list | None = None, allow: Policy | None = None,
) -> list[dict[str, Any]]:
    """GET ``url``, following up to ``max_redirects`` redirects by hand.

    Returns the hops in order (``x_redirect_index`` 0, 1, ...). Each hop gets a
    fresh connection and its own transaction id; ``bytes_received`` events go
    to ``events``. Never raises for network outcomes. ``allow``: the networks
    a redirect may lead into although they are not public (``--public-network``);
    ``url`` itself is fetched wherever it points.
    """
    events = [] if events is None else events
    sent = {**REQUEST_HEADERS, **(headers or {})}
    resolver = _PinnedResolver(pinned or {})
    guard = _Guard(allow or Policy(), resolver)
    connector = _RecordingConnector(
        resolver=resolver, ssl=context or make_context(),
        force_close=True, use_dns_cache=False,
    )
    entries: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        # Our own asyncio.timeout is the total deadline; aiohttp only bounds connect.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect),
        cookie_jar=aiohttp.CookieJar(unsafe=True),  # sites that set a cookie then redirect
        skip_auto_headers=("User-Agent",) if "User-Agent" in sent else (),
    ) as session:
        try:
            current: URL | None = URL(url)
        except (ValueError, TypeError) as exc:
            current = None
            entries.append(_invalid_url_entry(url, exc, clock, transactions.next(), sent))
        index = 0
        while current is not None:
            entry, follow = await _hop(
                session, connector, current, index, clock=clock, txid=transactions.next(),
                timeouts=timeouts, max_body=max_body, headers=sent, events=events,
                guard=guard if index > 0 else None,
            )
            if index == 0:
                origin = parse_ip(connector.peer_ip or "")
                guard.origin = str(canonical(origin)) if origin is not None else None
            entries.append(entry)
            if follow is not None and index >= max_redirects:
                entry["failure"] = failures.HTTP_TOO_MANY_REDIRECTS
                follow = None
            current = follow
            index += 1
    return entries


def _invalid_url_entry(url: str, exc: Exception, clock: Clock, txid: int, headers: dict[str, str]) -> dict[str, Any]:
    now = clock.now()
    return {
        "request": {"url": url, "method": "GET", "headers": dict(headers)}, "response": {},
        "failure": failures.classify(exc), "t0": now, "t": now, "transaction_id": txid,
        "x_redirect_index": 0, "x_address": None, "x_body_length": None, "x_body_sha256": None, "x_title": None,
    }
