"""The censor's TLS interception proxy.

Run inside the censor namespace as ``python -m lab.mitm --config FILE``. The
Censor REDIRECTs TCP 443 for the tls-mitm sites' addresses to this proxy. For
each connection it peeks (without consuming) at the ClientHello:

* SNI is a tls-mitm domain: terminate TLS with a certificate for that name,
  issued by the rogue CA (untrusted by probe and helper), open TLS to the
  original destination (the real site; its lab-CA certificate is not checked
  because the censor has no reason to care) and relay the plaintext;
* anything else: relay the bytes untouched to the original destination, so
  other names on the same address are not affected.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from pathlib import Path

from lab.dpi import matches, parse_sni, worker_config
from lab.pki import CA

log = logging.getLogger("vantage.lab.mitm")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect before REDIRECT rewrote it."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def peek_client_hello(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The first TLS record, left in the socket for whoever reads next."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        data = sock.recv(16384 + 5, socket.MSG_PEEK)
        if not data:
            break
        if len(data) >= 5 and len(data) >= 5 + struct.unpack_from("!H", data, 3)[0]:
            break
        if data[0] != 0x16:
            break  # not TLS; no point waiting for more
        time.sleep(0.01)  # MSG_PEEK returns at once once anything is queued
    return data


class Proxy:
    def __init__(self, config: dict):
        self.domains: list[str] = config["domains"]
        self.ca = CA(config["ca_name"], Path(config["ca_dir"]))
        self.cert_dir = Path(config["cert_dir"])
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.upstream = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.upstream.check_hostname = False
        self.upstream.verify_mode = ssl.CERT_NONE
        self.upstream.set_alpn_protocols(["http/1.1"])

    def context_for(self, name: str) -> ssl.SSLContext:
        """A server context whose certificate names ``name``, issued on first use."""
        if name not in self.contexts:
            cert, key = self.ca.issue([name], self.cert_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            # Only HTTP/1.1 is relayed; a client offering h2 falls back to it.
            ctx.set_alpn_protocols(["http/1.1"])
            self.contexts[name] = ctx
            log.info("issued rogue certificate for %s", name)
        return self.contexts[name]

    async def handle(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer = sock.getpeername()[:2]
        writers: list[asyncio.StreamWriter] = []
        try:
            dest = original_destination(sock)
            hello = await asyncio.to_thread(peek_client_hello, sock)
            sni = parse_sni(hello)
            sock.setblocking(False)
            intercept = any(matches(sni, d) for d in self.domains)
            reader = asyncio.StreamReader(limit=1 << 20)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.context_for(sni) if intercept else None,
                ssl_handshake_timeout=10 if intercept else None)
            writers.append(asyncio.StreamWriter(transport, protocol, reader, loop))
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                dest[0], dest[1], ssl=self.upstream if intercept else None,
                server_hostname=sni if intercept else None), 10)
            writers.append(up_writer)
            log.info("%s %s:%d -> %s:%d sni=%s", "intercept" if intercept else "pass", *peer, *dest, sni)
            await asyncio.gather(self.pump(reader, up_writer), self.pump(up_reader, writers[0]))
        except Exception as exc:  # one bad connection must not stop the proxy
            log.info("connection from %s:%d ended: %r", *peer, exc)
        finally:
            if not writers:
                sock.close()  # never handed to a transport
            for writer in writers:
                writer.close()

    @staticmethod
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
        except (ConnectionError, ssl.SSLError, OSError):
            writer.close()

    async def serve(self, port: int, ready: Path) -> None:
        for domain in self.domains:
            self.context_for(domain)  # issue up front so the first handshake is quick
        listeners = [self._listen(socket.AF_INET, "0.0.0.0", port)]
        try:
            # IPv6 on a listener of its own (not dual-stack): the original
            # destination is read with each family's own socket option.
            listeners.append(self._listen(socket.AF_INET6, "::", port))
        except OSError as exc:
            log.info("no IPv6 listener: %s", exc)
        ready.write_text("ready\n")
        log.info("listening on port %d for %s", port, ", ".join(self.domains))
        await asyncio.gather(*(self._accept(listener) for listener in listeners))

    @staticmethod
    def _listen(family: int, host: str, port: int) -> socket.socket:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
        return listener

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tasks = set()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self.handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def main(argv: list[str] | None = None) -> int:
    config = worker_config("python -m lab.mitm", __doc__.splitlines()[0], argv)
    try:
        asyncio.run(Proxy(config).serve(config["port"], Path(config["ready"])))
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("proxy failed")
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
