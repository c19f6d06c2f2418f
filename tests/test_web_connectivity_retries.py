"""Re-measure before accusing: web_connectivity retries a step that failed the
censor's way and records every attempt (``x_attempt``), on loopback servers."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

import servers
from probes import web_connectivity as wc
from probes.context import ProbeContext
from probes.records import Clock
from probes.timeouts import Timeouts


async def _measure(url: str, timeouts: Timeouts | None = None) -> tuple[dict, float]:
    ctx = ProbeContext(timeouts=timeouts or Timeouts())
    keys = wc.new_test_keys()
    started = time.monotonic()
    finisher = await wc.measure(url, ctx, keys, Clock())
    await finisher
    return keys, time.monotonic() - started


class ResetFirst:
    """Plain HTTP on loopback: the first ``resets`` requests are reset (RST)
    mid-body, the next ones get a page."""

    def __init__(self, resets: int) -> None:
        self.resets = resets
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # the probe's TCP step sends no request
            self.connections += 1
            if self.connections <= self.resets:
                # mid-body, so that no HTTP client can take it for a stale
                # keep-alive connection and quietly send the request again
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 100)
                await writer.drain()
                await asyncio.sleep(0.05)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(servers.PAGE) + servers.PAGE)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    async def __aenter__(self) -> "ResetFirst":
        self.server = await asyncio.start_server(self._handle, servers.LOOPBACK, 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]


async def test_a_working_site_is_measured_once():
    async with servers.WebServer() as site:
        keys, _ = await _measure(site.url("/"))
    assert [c["x_attempt"] for c in keys["tcp_connect"]] == [0]
    assert [r["x_attempt"] for r in keys["requests"]] == [0]
    assert keys["requests"][0]["failure"] is None


async def test_a_refused_connect_is_tried_three_times_with_backoff():
    port = servers.closed_port()
    keys, elapsed = await _measure(f"http://127.0.0.1:{port}/")
    assert [(c["x_attempt"], c["status"]["failure"]) for c in keys["tcp_connect"]] == [
        (0, "connection_refused"), (1, "connection_refused"), (2, "connection_refused")]
    assert keys["requests"] == []
    assert wc.BACKOFF * 3 <= elapsed < wc.BACKOFF * 3 + 3.0  # 0.5 s + 1 s of backoff, and slack for a loaded machine


async def test_a_fetch_reset_once_then_served_records_both_attempts():
    async with ResetFirst(resets=1) as site:
        keys, _ = await _measure(f"http://127.0.0.1:{site.port}/")
    assert [(r["x_attempt"], r["failure"]) for r in keys["requests"]] == [(0, "connection_reset"), (1, None)]
    assert keys["requests"][-1]["response"]["code"] == 200


async def test_a_fetch_reset_every_time_stops_after_three_attempts():
    async with ResetFirst(resets=99) as site:
        keys, _ = await _measure(f"http://127.0.0.1:{site.port}/")
    assert [(r["x_attempt"], r["failure"]) for r in keys["requests"]] == [
        (0, "connection_reset"), (1, "connection_reset"), (2, "connection_reset")]


async def test_no_retry_that_would_overrun_the_deadline():
    # a 1 s connect timeout and a 5 s measurement, of which retries may take
    # 60% (3 s): the first retry (0.5 s of backoff, then up to 1 s) fits, the
    # second (1 s more of backoff, 1 s of connect) does not
    assert wc.RETRY_SHARE == 0.6
    with servers.Blackhole() as port:
        keys, elapsed = await _measure(f"http://127.0.0.1:{port}/", Timeouts(connect=1.0, measurement=5.0))
    assert [(c["x_attempt"], c["status"]["failure"]) for c in keys["tcp_connect"]] == [
        (0, "generic_timeout_error"), (1, "generic_timeout_error")]
    assert elapsed < 3.0


@pytest.mark.parametrize("failure", ["host_unreachable", "ssl_unknown_authority", None])
def test_what_is_not_retried(failure):
    assert failure not in wc.TCP_RETRY | wc.TLS_RETRY | wc.HTTP_RETRY
