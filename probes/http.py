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
  before the deadline are kept, and every chunk is a ``bytes_received``
  network event (the raw material of throttling analysis).
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

from core.net import REDIRECT_CODES, REQUEST_HEADERS, endpoint

from . import failures
from .records import Clock, Transactions, body_field, network_event, title_bytes
from .timeouts import Timeouts
from .tls import make_context

MAX_BODY = 512 * 1024

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
    """Resolves pinned names to the measured address; others via getaddrinfo."""

    def __init__(self, pinned: dict[str, str]) -> None:
        self._pinned = {name.lower().rstrip("."): ip for name, ip in pinned.items()}
        self._fallback = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        ip = self._pinned.get(host.lower().rstrip("."))
        if ip is None:
            return await self._fallback.resolve(host, port, family)
        return [ResolveResult(
            hostname=host, host=ip, port=port, family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
            proto=0, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        )]

    async def close(self) -> None:
        await self._fallback.close()


class _RecordingConnector(aiohttp.TCPConnector):
    """Remembers the peer of the last connection made: the ``x_address`` of a hop
    (connections are never reused, so "last" is "this hop's")."""

    peer: str | None = None

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        connection = await super().connect(req, traces, timeout)
        transport = connection.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if peer:
            self.peer = endpoint(peer[0], peer[1])
        return connection


def _first_values(headers: Any) -> dict[str, str]:
    """OONI's ``headers`` map holds one value per name; ``headers_list`` has all."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        out.setdefault(name, value)
    return out


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
) -> tuple[dict[str, Any], URL | None]:
    """One GET; returns its entry and the redirect target to follow, if any."""
    connector.peer = None
    t0 = clock.now()
    response: dict[str, Any] = {}
    body = bytearray()
    truncated = False
    follow: URL | None = None
    failure: str | None = None
    content_type: str | None = None
    try:
        async with asyncio.timeout(timeouts.http):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                content_type = resp.headers.get("Content-Type")
                response = {
                    "code": resp.status,
                    "headers": _first_values(resp.headers),
                    "headers_list": [[k, v] for k, v in resp.headers.items()],
                    "body": None,
                    "body_is_truncated": False,
                }
                if resp.status in REDIRECT_CODES and "Location" in resp.headers:
                    follow = _next_url(url, resp.headers["Location"])
                    if follow is None:
                        failure = failures.HTTP_INVALID_REDIRECT
                decoder = _Decoder(resp.headers.get("Content-Encoding"))
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    events.append(network_event(
                        operation="bytes_received", t=clock.now(), transaction_id=txid,
                        num_bytes=len(chunk), address=connector.peer,
                    ))
                    # One byte past the cap tells "exactly max_body" from "more".
                    body += decoder.decode(chunk, max_body - len(body) + 1)
                    if len(body) > max_body:
                        del body[max_body:]
                        truncated = True
                        break
    except zlib.error:
        failure = failures.HTTP_REQUEST_FAILED  # a body that does not match its Content-Encoding
    except Exception as exc:  # every network outcome is recorded, not raised
        failure = failures.classify(exc)
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
    events: list | None = None,
) -> list[dict[str, Any]]:
    """GET ``url``, following up to ``max_redirects`` redirects by hand.

    Returns the hops in order (``x_redirect_index`` 0, 1, ...). Each hop gets a
    fresh connection and its own transaction id; ``bytes_received`` events go
    to ``events``. Never raises for network outcomes.
    """
    events = [] if events is None else events
    sent = {**REQUEST_HEADERS, **(headers or {})}
    connector = _RecordingConnector(
        resolver=_PinnedResolver(pinned or {}), ssl=context or make_context(),
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
            )
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
