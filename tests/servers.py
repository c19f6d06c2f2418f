"""Loopback servers that behave like censored and uncensored networks, for tests.

Everything listens on 127.0.0.1 with an ephemeral port; nothing here talks to
any other address. Each server is an async context manager::

    async with DNSServer() as dns_server:
        dns_server.program("blocked.test", inject=["10.10.34.35"], answer=["127.0.0.1"])
        ... udp_lookup("blocked.test", dns_server.address, ...)

``tests/conftest.py`` wraps them in pytest fixtures of the same names, which
is how other suites should use them (``tests/`` is on ``sys.path`` while
pytest runs, so ``import servers`` works from any test module).

- :class:`PKI`: a trustme test CA (trusted through ``ca_file``) and a rogue CA
  (never trusted), with server contexts for good, expired, wrong-host and
  unknown-authority certificates.
- :class:`DNSServer`: UDP DNS with programmable behaviour per name.
- :class:`WebServer`: aiohttp HTTP or HTTPS site with the endpoints below.
- :class:`RawServer`: TCP servers that misbehave on purpose (reset after the
  ClientHello, silent, clean close) or complete TLS with a chosen certificate.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import gzip
import select
import socket
import ssl
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trustme
from aiohttp import web

LOOPBACK = "127.0.0.1"
IDENTITIES = ("localhost", "127.0.0.1", "::1")

TITLE = "Vantage test page"
PAGE = f"<!doctype html><html><head><title>{TITLE}</title></head><body><p>hello</p></body></html>".encode()
LARGE_SIZE = 600 * 1024  # above the probe's 512 KiB body cap
BOMB_SIZE = 50 * 1024 * 1024  # decompressed size of /bomb


def closed_port() -> int:
    """A loopback TCP port with nothing listening (connects get refused).
    Bound then released; the kernel does not hand it out again right away."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Blackhole:
    """A loopback port where SYNs go unanswered, like a censor dropping them.

    A listener with a zero backlog that never accepts: once its queue is full
    the kernel drops further SYNs, so connects time out. ``with Blackhole() as
    port:`` fills the queue first and closes everything on exit.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._fillers: list[socket.socket] = []

    def __enter__(self) -> int:
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(0)
        port = self._listener.getsockname()[1]
        for _ in range(16):  # kernels differ in how many a zero backlog admits
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex((LOOPBACK, port))
            self._fillers.append(filler)
            _, writable, _ = select.select([], [filler], [], 0.05)
            if not writable:
                break  # this SYN was dropped: the queue is full
        return port

    def __exit__(self, *exc: Any) -> None:
        for sock in self._fillers:
            sock.close()
        self._listener.close()


# --- certificates -----------------------------------------------------------------


class PKI:
    """Test certificate authorities and server TLS contexts.

    ``ca_file`` (PEM of the trusted CA) is what the probe's
    ``make_context(extra_ca_file)`` loads; ``rogue`` stands for a CA the probe
    has never heard of, as in a TLS interception box.
    """

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.rogue = trustme.CA()
        self.ca_file = str(directory / "vantage-test-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        now = dt.datetime.now(dt.timezone.utc)
        self.good = self.ca.issue_cert(*IDENTITIES)
        self.expired = self.ca.issue_cert(
            *IDENTITIES, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        )
        self.wrong_host = self.ca.issue_cert("wrong-host.test")
        self.unknown_authority = self.rogue.issue_cert(*IDENTITIES)

    @staticmethod
    def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only the test CA (no system roots)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        return context


# --- DNS ---------------------------------------------------------------------------


@dataclass
class Rule:
    """What the server does for one name.

    ``answer``: addresses (v4 and v6 mixed; each query type gets its own);
    an empty list with rcode NOERROR is a "no answer" reply. ``cname``: the
    name is an alias of this one, whose records carry the addresses.
    ``inject``: addresses of a forged reply sent at once, the genuine reply
    following ``inject_delay`` seconds later. ``silent``: never reply.
    """

    answer: list[str] = field(default_factory=list)
    rcode: str = "NOERROR"
    cname: str | None = None
    inject: list[str] | None = None
    inject_delay: float = 0.2
    silent: bool = False
    ttl: int = 60
    truncate: bool = False  # UDP replies carry the TC bit and no records; TCP answers in full


def _fill(response: dns.message.Message, qname: dns.name.Name, qtype: int, addresses: list[str], rule: Rule) -> None:
    owner = qname
    if rule.cname:
        target = dns.name.from_text(rule.cname)
        response.answer.append(dns.rrset.from_text(owner, rule.ttl, "IN", "CNAME", target.to_text()))
        owner = target
    wanted = [a for a in addresses if (":" in a) == (qtype == dns.rdatatype.AAAA)]
    if qtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and wanted:
        response.answer.append(
            dns.rrset.from_text_list(owner, rule.ttl, "IN", dns.rdatatype.to_text(qtype), wanted)
        )


class DNSResponder:
    """The rule table and the reply logic, shared by the UDP and DoH servers."""

    def __init__(self) -> None:
        self.rules: dict[str, Rule] = {}
        self.received: list[tuple[str, str]] = []  # (name, type) of each query seen

    def program(self, name: str, *, a: list[str] = (), aaaa: list[str] = (), **behaviour: Any) -> Rule:
        """Set the behaviour for ``name`` (see :class:`Rule`); ``a=`` and
        ``aaaa=`` are accepted as spellings of ``answer=`` for one family."""
        if a or aaaa:
            behaviour["answer"] = [*behaviour.get("answer", ()), *a, *aaaa]
        rule = Rule(**behaviour)
        self.rules[name.lower().rstrip(".")] = rule
        return rule

    def replies(self, wire: bytes, tcp: bool = False) -> list[tuple[float, bytes]]:
        """(delay, datagram) pairs answering ``wire``; unknown names get NXDOMAIN."""
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.received.append((name, dns.rdatatype.to_text(question.rdtype)))
        rule = self.rules.get(name, Rule(rcode="NXDOMAIN"))
        if rule.silent:
            return []
        if rule.truncate and not tcp:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return [(0.0, truncated.to_wire())]
        genuine = dns.message.make_response(query)
        genuine.set_rcode(dns.rcode.from_text(rule.rcode))
        if rule.rcode == "NOERROR":
            _fill(genuine, question.name, question.rdtype, rule.answer, rule)
        if rule.inject is None:
            return [(0.0, genuine.to_wire())]
        forged = dns.message.make_response(query)
        _fill(forged, question.name, question.rdtype, rule.inject, Rule(ttl=rule.ttl))
        return [(0.0, forged.to_wire()), (rule.inject_delay, genuine.to_wire())]


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: DNSResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            replies = self.responder.replies(data)
        except Exception:  # garbage in: a real resolver would drop it too
            return
        loop = asyncio.get_running_loop()
        for delay, payload in replies:
            loop.call_later(delay, self._send, payload, addr)

    def _send(self, payload: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(payload, addr)


class TwinPortServer:
    """One port on 127.0.0.1 for both UDP and TCP, as a DNS server has;
    ``address`` is "127.0.0.1:port". A subclass gives the datagram protocol
    (``_udp_protocol()``) and the stream handler (``_tcp(reader, writer)``)."""

    port = 0
    transport: asyncio.DatagramTransport | None = None
    tcp_server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _udp_protocol(self) -> asyncio.DatagramProtocol:
        raise NotImplementedError

    async def start(self):  # -> Self
        loop = asyncio.get_running_loop()
        for _ in range(20):  # a UDP port whose TCP twin is free
            self.transport, _ = await loop.create_datagram_endpoint(self._udp_protocol, local_addr=(LOOPBACK, 0))
            self.port = self.transport.get_extra_info("sockname")[1]
            try:
                self.tcp_server = await asyncio.start_server(self._tcp, LOOPBACK, self.port)
                break
            except OSError:
                self.transport.close()
        return self

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.tcp_server is not None:
            self.tcp_server.close()

    async def __aenter__(self):  # -> Self
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


class DNSServer(DNSResponder, TwinPortServer):
    """UDP DNS server on 127.0.0.1; ``address`` is "127.0.0.1:port". The same
    port answers over TCP too (RFC 7766 framing); ``tcp_queries`` counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.DatagramTransport | None = None
        self.tcp_server: asyncio.Server | None = None
        self.tcp_queries = 0
        self.port = 0

    def _udp_protocol(self) -> asyncio.DatagramProtocol:
        return _UDPProtocol(self)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                wire = await reader.readexactly(size)
                self.tcp_queries += 1
                replies = self.replies(wire, tcp=True)
                if not replies:
                    continue
                payload = replies[-1][1]
                writer.write(struct.pack("!H", len(payload)) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # garbage in
            pass
        finally:
            writer.close()


# --- HTTP(S) -----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """BOMB_SIZE zero bytes, gzip-compressed (about 50 KB on the wire)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(BOMB_SIZE // len(chunk))]
    parts.append(compressor.flush())
    return b"".join(parts)


class WebServer:
    """aiohttp site on 127.0.0.1, plain HTTP or HTTPS (``ssl_context``).

    Endpoints:
      ``/``, ``/page``   page with a <title>
      ``/gzip``          the same page, gzip-encoded
      ``/deflate``       the same page, deflate (zlib) encoded
      ``/redirect``      302 to ``/``
      ``/chain/{n}``     n redirects in a row, ending on ``/``
      ``/loop``          302 to itself, forever
      ``/bad-redirect``  302 to a non-HTTP URL
      ``/large``         LARGE_SIZE bytes
      ``/bomb``          gzip bomb, BOMB_SIZE zeros when decompressed
      ``/trickle``       a 200 whose body drips one byte every 50 ms, forever
      ``/reset``         the connection is reset (RST) before any response
      ``/cut``           100 of 4096 promised bytes, then a clean close (FIN)
      ``/cut-reset``     100 of 4096 promised bytes, then a reset (RST)
      ``/dns-query``     DoH (RFC 8484, GET and POST) answering from ``responder`` (``self.dns``)
      ``/status/{code}`` an empty response with that status
      ``/redirect-to``   302 to the URL in ``?location=``
    ``hits`` counts requests per path. ``host``: another loopback address
    (127.0.0.2 ...) stands for a second machine.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None, responder: DNSResponder | None = None,
                 host: str = LOOPBACK) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.dns = responder or DNSResponder()
        self.hits: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        return await handler(request)

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/", self._page)
        app.router.add_get("/page", self._page)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/deflate", self._deflate)
        app.router.add_get("/redirect", self._to_page)
        app.router.add_get("/chain/{n}", self._chain)
        app.router.add_get("/loop", self._loop)
        app.router.add_get("/bad-redirect", self._bad_redirect)
        app.router.add_get("/large", self._large)
        app.router.add_get("/bomb", self._bomb)
        app.router.add_get("/trickle", self._trickle)
        app.router.add_get("/reset", self._reset)
        app.router.add_get("/cut", self._cut)
        app.router.add_get("/cut-reset", self._cut)
        app.router.add_route("*", "/dns-query", self._doh)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect-to", self._redirect_to)
        return app

    async def _redirect_to(self, request: web.Request) -> web.Response:
        return self._redirect(request.query["location"])

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")

    async def _gzip(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(PAGE), headers={"Content-Encoding": "gzip", "Content-Type": "text/html"})

    async def _deflate(self, request: web.Request) -> web.Response:
        return web.Response(body=zlib.compress(PAGE), headers={"Content-Encoding": "deflate", "Content-Type": "text/html"})

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=302, headers={"Location": location})

    async def _to_page(self, request: web.Request) -> web.Response:
        return self._redirect("/")

    async def _loop(self, request: web.Request) -> web.Response:
        return self._redirect("/loop")

    async def _bad_redirect(self, request: web.Request) -> web.Response:
        return self._redirect("ftp://localhost/file")

    async def _chain(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return self._redirect(f"/chain/{n - 1}" if n > 1 else "/")

    async def _large(self, request: web.Request) -> web.Response:
        return web.Response(body=b"a" * LARGE_SIZE, content_type="text/plain")

    async def _bomb(self, request: web.Request) -> web.Response:
        return web.Response(body=gzip_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "text/html"})

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            for _ in range(2400):  # bounded at two minutes so a stray client cannot pin the server
                await response.write(b"x")
                await asyncio.sleep(0.05)
        except (ConnectionError, RuntimeError):  # the client gave up, as it should
            pass
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        reset(request.transport)
        raise asyncio.CancelledError  # aiohttp drops the handler quietly

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        """Promise 4096 bytes, send 100, then close (FIN) or, on /cut-reset, reset."""
        response = web.StreamResponse(headers={"Content-Type": "text/plain", "Content-Length": "4096"})
        await response.prepare(request)
        await response.write(b"y" * 100)
        await asyncio.sleep(0.05)  # let the first bytes reach the client
        if request.path == "/cut-reset":
            reset(request.transport)
        elif request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError

    async def _doh(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            encoded = request.query.get("dns", "")
            wire = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        elif request.method == "POST" and request.content_type == "application/dns-message":
            wire = await request.read()
        else:
            return web.Response(status=415)
        replies = self.dns.replies(wire)
        if not replies:
            await asyncio.sleep(3600)  # a silent resolver behind DoH: the client must time out
        return web.Response(body=replies[-1][1], content_type="application/dns-message")

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def start(self) -> "WebServer":
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "WebServer":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


# --- raw TCP / TLS misbehaviour ---------------------------------------------------------


async def serve_app(app: web.Application, host: str = LOOPBACK, **runner_options: Any) -> tuple[web.AppRunner, str]:
    """The aiohttp ``app`` on ``host``, an ephemeral port: its runner (``await
    runner.cleanup()`` stops it) and its base URL ``http://host:port``
    (``runner_options``: web.AppRunner's, e.g. access_log=None). Tests use the
    ``serve_app`` fixture of conftest.py, which stops it at the end."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://{f'[{host}]' if ':' in host else host}:{port}"


def reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with a RST instead of a FIN (SO_LINGER with a zero timeout), the
    way an injecting middlebox tears connections down."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
    len(PAGE), PAGE,
)


class StreamServer:
    """Start/stop of an asyncio stream server on ``self.host``, port 0.

    A subclass may set ``host`` and ``_writers = set()`` (the connections
    ``stop`` aborts), defines
    ``_handle(reader, writer)`` and may add ``asyncio.start_server`` keywords
    in ``_server_kwargs()``.
    """

    host: str = LOOPBACK
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] | frozenset = frozenset()  # none tracked unless a subclass sets a set

    def _server_kwargs(self) -> dict[str, Any]:
        return {}

    async def start(self):  # -> Self
        self._server = await asyncio.start_server(self._handle, self.host, 0, **self._server_kwargs())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def __aenter__(self):  # -> Self
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


class RawServer(StreamServer):
    """A TCP server on 127.0.0.1 with one fixed behaviour per connection.

    ``mode``: ``"rst"`` reads the first bytes (the ClientHello) and resets;
    ``"eof"`` reads them and closes cleanly; ``"silent"`` accepts and never
    sends anything; ``"tls"`` completes a TLS handshake with ``ssl_context``
    and answers any request with a small page.
    """

    MODES = ("rst", "eof", "silent", "tls")

    def __init__(self, mode: str, ssl_context: ssl.SSLContext | None = None) -> None:
        if mode not in self.MODES or (mode == "tls") != (ssl_context is not None):
            raise ValueError(f"bad RawServer mode {mode!r} / context")
        self.mode = mode
        self.ssl_context = ssl_context
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.mode == "silent":
                await reader.read()  # until the client leaves
            elif self.mode in ("rst", "eof"):
                await reader.read(4096)
                if self.mode == "rst":
                    reset(writer.transport)
                    return
            else:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(HTTP_OK)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _server_kwargs(self) -> dict[str, Any]:
        # ssl_handshake_timeout keeps the server from holding half-done handshakes.
        return {"ssl": self.ssl_context, "ssl_handshake_timeout": 5.0} if self.ssl_context else {}
