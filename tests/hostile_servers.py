"""Loopback servers that attack the probe, one behaviour per path (issue 10).

Everything listens on 127.0.0.x only. :class:`HostileHTTP` is a raw asyncio
server (aiohttp's would refuse to send most of this); :class:`HostileDNS`
answers over UDP and TCP. Both are async context managers; :class:`InThread`
runs any of them (and ``servers.WebServer``) on an event loop of its own, so
that `vantage run` subprocesses can be driven without an event loop in the test.

HostileHTTP paths:
  ``/page``                 an ordinary page
  ``/gzip-bomb``            50 MiB of zeros, gzip (50 KB on the wire)
  ``/deflate-bomb``         50 MiB of zeros, deflate (zlib)
  ``/endless-deflate``      ``Content-Encoding: deflate``, ``78 01``, then ``00 00 00 ff ff`` forever, fast
  ``/endless-deflate-slow`` the same, 5 bytes every 10 ms (only a deadline ends it)
  ``/trickle``              identity body, one byte every 50 ms
  ``/endless-chunked``      chunked body of 1-byte chunks, forever
  ``/header-flood``         302 to itself with 120 headers of 8000 bytes
  ``/fat-redirect``         302 to itself with a 1 MiB body
  ``/redirect-loop``        302 to itself
  ``/redirect-to?location=URL``  302 to URL
  ``/invalid-utf8``         invalid UTF-8 in headers, title and body
  ``/secret``               the volunteer's local page (must never be fetched)
``hits`` counts requests per path.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import struct
import threading
import zlib
from typing import Any
from urllib.parse import parse_qs, urlsplit

import dns.flags
import dns.message
import dns.rrset

import servers

PAGE = servers.PAGE
BOMB_SIZE = 50 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def deflate_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    return b"".join([compressor.compress(chunk) for _ in range(BOMB_SIZE // len(chunk))] + [compressor.flush()])


def _head(status: str, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> bytes:
    lines = [f"HTTP/1.1 {status}".encode()]
    for name, value in headers:
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class HostileHTTP(servers.StreamServer):
    def __init__(self, host: str = servers.LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self.hits: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, path: str = "/page", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            parts = urlsplit(target)
            self.hits[parts.path] = self.hits.get(parts.path, 0) + 1
            await self._respond(parts.path, parse_qs(parts.query), writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, path: str, query: dict[str, list[str]], w: asyncio.StreamWriter) -> None:
        close = ("Connection", "close")
        if path == "/page":
            w.write(_head("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE))), close]) + PAGE)
        elif path in ("/gzip-bomb", "/deflate-bomb"):
            body, encoding = (servers.gzip_bomb(), "gzip") if path == "/gzip-bomb" else (deflate_bomb(), "deflate")
            w.write(_head("200 OK", [("Content-Type", "text/html"), ("Content-Encoding", encoding),
                                     ("Content-Length", str(len(body))), close]) + body)
        elif path in ("/endless-deflate", "/endless-deflate-slow"):
            w.write(_head("200 OK", [("Content-Type", "text/html"), ("Content-Encoding", "deflate"), close]) + b"\x78\x01")
            empty_block = b"\x00\x00\x00\xff\xff"
            slow = path.endswith("slow")
            block = empty_block if slow else empty_block * 13000  # 64 KiB per write
            for _ in range(20000 if slow else 100000):  # bounded: a stray client cannot pin the server
                w.write(block)
                await w.drain()
                if slow:
                    await asyncio.sleep(0.01)
        elif path == "/trickle":
            w.write(_head("200 OK", [("Content-Type", "text/plain"), close]))
            for _ in range(2400):
                w.write(b"x")
                await w.drain()
                await asyncio.sleep(0.05)
        elif path == "/endless-chunked":
            w.write(_head("200 OK", [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")]))
            block = b"1\r\nz\r\n" * 10000
            for _ in range(10000):
                w.write(block)
                await w.drain()
        elif path == "/header-flood":
            flood = [(f"X-Flood-{i}", "f" * 8000) for i in range(120)]
            w.write(_head("302 Found", [("Location", "/header-flood"), ("Content-Length", "0"), close] + flood))
        elif path == "/fat-redirect":
            body = b"r" * (1024 * 1024)
            w.write(_head("302 Found", [("Location", "/fat-redirect"), ("Content-Length", str(len(body))), close]) + body)
        elif path == "/redirect-loop":
            w.write(_head("302 Found", [("Location", "/redirect-loop"), ("Content-Length", "0"), close]))
        elif path == "/redirect-to":
            w.write(_head("302 Found", [("Location", query["location"][0]), ("Content-Length", "0"), close]))
        elif path == "/invalid-utf8":
            body = b"<html><head><title>bad \xff\xfe\xc3( title</title></head><body>\x80\x81 \xed\xa0\x80</body></html>"
            w.write(_head("200 OK", [(b"Content-Type", b"text/html; charset=utf-8"), (b"X-Bad", b"\xff\xfe\xc3("),
                                     (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]) + body)
        elif path == "/secret":
            body = b"<title>router admin</title>the volunteer's local page"
            w.write(_head("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(body))), close]) + body)
        else:
            w.write(_head("404 Not Found", [("Content-Length", "0"), close]))
        await w.drain()

    def _server_kwargs(self) -> dict[str, Any]:
        return {"limit": 256 * 1024}


# --- DNS --------------------------------------------------------------------------------


class _HostileUDP(asyncio.DatagramProtocol):
    def __init__(self, owner: "HostileDNS") -> None:
        self.owner = owner
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        self.owner.udp_queries += 1
        loop = asyncio.get_running_loop()
        for delay, payload in self.owner.udp_replies(query):
            if delay:
                loop.call_later(delay, self._send, payload, addr)
            else:
                self._send(payload, addr)

    def _send(self, payload: bytes, addr: Any) -> None:
        if not self.transport.is_closing():
            self.transport.sendto(payload, addr)


class HostileDNS(servers.TwinPortServer):
    """A resolver answering every name with ``answer``, misbehaving per ``mode``:

    - ``flood``: each query gets 2,000 copies of the reply;
    - ``big``: one reply carrying 3,000 A records;
    - ``garbage``: 200 random datagrams and replies with the wrong id, then the real reply;
    - ``tc``: UDP replies have the TC bit set and no records; TCP answers;
    - ``tc-cut``: the TC reply is cut mid-record (as some servers send it); TCP answers.
    """

    MODES = ("flood", "big", "garbage", "tc", "tc-cut")

    def __init__(self, mode: str, answer: str = servers.LOOPBACK) -> None:
        if mode not in self.MODES:
            raise ValueError(mode)
        self.mode = mode
        self.answer = answer
        self.port = 0
        self.udp_queries = 0
        self.tcp_queries = 0
        self.transport: Any = None
        self.tcp_server: asyncio.Server | None = None

    def _reply(self, query: dns.message.Message, count: int = 1) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.rdtype == dns.rdatatype.A:
            if count == 1:
                addresses = [self.answer]
            else:
                # Loopback, where nothing listens: a connection to one is refused at once, and
                # nothing leaves the machine (198.18.0.0/15 went out of a host with a default route).
                addresses = [self.answer] + [f"127.77.{i // 250}.{i % 250 + 1}" for i in range(count - 1)]
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "A", addresses))
        return response

    def udp_replies(self, query: dns.message.Message) -> list[tuple[float, bytes]]:
        if self.mode == "flood":
            wire = self._reply(query).to_wire()
            return [(0.0, wire)] * 2000
        if self.mode == "big":
            return [(0.0, self._reply(query, 3000).to_wire())]
        if self.mode == "garbage":
            rng = random.Random(query.id)
            out = [(0.0, rng.randbytes(rng.randrange(1, 600))) for _ in range(150)]
            for _ in range(50):
                wrong = self._reply(query)
                wrong.id = (query.id + 1 + rng.randrange(1000)) % 65536
                out.append((0.0, wrong.to_wire()))
            out.append((0.05, self._reply(query).to_wire()))
            return out
        truncated = self._reply(query)
        truncated.flags |= dns.flags.TC
        if self.mode == "tc":
            truncated.answer = []
            return [(0.0, truncated.to_wire())]
        return [(0.0, truncated.to_wire()[:-3])]  # tc-cut: the last record is cut short

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            query = dns.message.from_wire(await reader.readexactly(size))
            self.tcp_queries += 1
            payload = self._reply(query).to_wire()
            writer.write(struct.pack("!H", len(payload)) + payload)
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    def _udp_protocol(self) -> asyncio.DatagramProtocol:
        return _HostileUDP(self)


# --- running them beside subprocesses ---------------------------------------------------


class InThread:
    """Servers started on an event loop in a daemon thread: ``with InThread() as t:
    web = t.start(servers.WebServer())``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-servers", daemon=True)
        self._started: list[Any] = []

    def __enter__(self) -> "InThread":
        self._thread.start()
        return self

    def start(self, server: Any) -> Any:
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(10)
        self._started.append(server)
        return server

    def __exit__(self, *exc: Any) -> None:
        for server in reversed(self._started):
            try:
                asyncio.run_coroutine_threadsafe(server.stop(), self.loop).result(10)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


# `python -c VANTAGE` + CLI arguments: `vantage` itself, with (1) names under
# .test answered "no resolver reachable" by the system resolver (glibc
# against a dead resolver, musl against a TC reply; and no test name ever
# reaches a real resolver; names ending hang.test hang for a minute), (2) the size of each record as the probe built
# it (before the store's own bounds) and (3) the peak RSS, on stderr.
VANTAGE = r"""
import atexit, os, socket, sys
_real = socket.getaddrinfo
def _gai(host, *args, **kwargs):
    if isinstance(host, str) and host.rstrip(".").endswith("hang.test"):
        import time
        time.sleep(60)  # a resolver that never answers
    if isinstance(host, str) and host.rstrip(".").endswith(".test"):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    return _real(host, *args, **kwargs)
socket.getaddrinfo = _gai
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB=%s\n" % line.split()[1])
atexit.register(_peak)
from probes import store as _store
def _bytes(value):  # what the record holds: text and keys by length, 8 bytes a number
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_bytes(k) + _bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 8
_aput = _store.Sink.aput
async def _aput_measured(self, record, *args, **kwargs):
    sys.stderr.write("RECORD_BYTES=%d\n" % _bytes(record))
    return await _aput(self, record, *args, **kwargs)
_store.Sink.aput = _aput_measured
sys.argv = ["vantage"] + sys.argv[1:]
from cli.main import main
main()
"""
