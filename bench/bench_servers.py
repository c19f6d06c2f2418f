"""Loopback servers for the probe benchmark: a DNS server answering every name
with 127.0.0.1 and an HTTP server serving a small page, each adding a fixed
delay before every response (the kernel here has no netem).

Run inside a network namespace: ``python bench/bench_servers.py --delay 0.1``.
Prints "ready" once both listen.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from typing import Callable

import dns.message
import dns.rcode
import dns.rrset
from aiohttp import web

PAGE = "<html><head><title>Bench site</title></head><body>" + "lorem ipsum " * 400 + "</body></html>"


_LOCALHOST_A = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + bytes([127, 0, 0, 1])  # -> the question's name


def _fast_answer(data: bytes) -> bytes | None:
    """The reply to a plain query (one question, no EDNS nor other records),
    built by hand: what dnspython's make_response gives (QR, the query's RD
    and opcode; one A record for an A question, no data otherwise), at a
    fraction of its CPU (the bench's servers share the machine with what they
    measure). None for anything else: dnspython answers those."""
    if len(data) < 17:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!HHHHHH", data)
    if flags & 0x8000 or qdcount != 1 or ancount or nscount or arcount:
        return None
    at = 12
    while True:  # the question's name: labels, no compression in a query
        length = data[at]
        if length & 0xC0:
            return None
        at += 1 + length
        if length == 0:
            break
        if at >= len(data):
            return None
    if at + 4 != len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, at)
    answer = _LOCALHOST_A if qtype == 1 and qclass == 1 else b""
    reply_flags = 0x8000 | (flags & 0x7900)  # QR + opcode + RD (dns.message.make_response)
    return struct.pack("!HHHHHH", ident, reply_flags, 1, 1 if answer else 0, 0, 0) + data[12:] + answer


class DNSProtocol(asyncio.DatagramProtocol):
    """Answers every A query with 127.0.0.1 and every other type with no data,
    ``delay`` seconds after it arrives (0: at once)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self._answer, data, addr)
        else:
            self._answer(data, addr)

    def _answer(self, data, addr):
        fast = _fast_answer(data)
        if fast is not None:
            self.transport.sendto(fast, addr)
            return
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.rdtype == 1:  # A
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", "127.0.0.1"))
        self.transport.sendto(response.to_wire(), addr)


async def serve_page(page: str | bytes, delay: float, port: int = 0, backlog: int = 1024,
                     on_request: Callable[[], None] | None = None) -> web.AppRunner:
    """An HTTP server on 127.0.0.1:``port`` answering every path with ``page``
    ``delay`` seconds after the request (``on_request`` is told of each one)."""

    async def handle(request: web.Request) -> web.Response:
        if on_request is not None:
            on_request()
        await asyncio.sleep(delay)
        if isinstance(page, str):
            return web.Response(text=page, content_type="text/html")
        return web.Response(body=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=backlog).start()
    return runner


class _RawHTTP(asyncio.Protocol):
    """One request a connection: after the request's head, ``delay`` seconds,
    then ``response`` and the connection closed (``Connection: close``)."""

    def __init__(self, response: bytes, delay: float):
        self.response, self.delay = response, delay
        self.head = b""
        self.answered = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.answered:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.answered = True
            asyncio.get_running_loop().call_later(self.delay, self._respond)
        elif len(self.head) > 64 * 1024:
            self.transport.close()

    def _respond(self):
        if not self.transport.is_closing():
            self.transport.write(self.response)
            self.transport.close()


async def serve_page_raw(page: str, delay: float, port: int = 0, backlog: int = 1024) -> asyncio.AbstractServer:
    """``serve_page``'s answer (200, text/html, the page) from a bare asyncio
    protocol instead of aiohttp's server: a tenth of its CPU a request. For the
    real-run benchmark, where these servers share the 2 cores with the probe
    and the helper they stand in for the internet for (no Server or Date
    header; the clients measured close each connection after one request anyway)."""
    body = page.encode()
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _RawHTTP(response, delay), "127.0.0.1", port, backlog=backlog)


async def main(delay: float, http_port: int, dns_port: int, raw_http: bool = False) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: DNSProtocol(delay), local_addr=("127.0.0.1", dns_port))
    if raw_http:
        await serve_page_raw(PAGE, delay, http_port)
    else:
        await serve_page(PAGE, delay, http_port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--raw-http", action="store_true", help="serve the page from a bare asyncio protocol (serve_page_raw)")
    args = parser.parse_args()
    asyncio.run(main(args.delay, args.http_port, args.dns_port, args.raw_http))
