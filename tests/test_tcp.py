"""TCP connect primitive: each outcome has its own failure string."""

from __future__ import annotations

import asyncio
import errno

import pytest

import servers
from probes import failures, tcp
from probes.records import Clock

pytestmark = pytest.mark.timeout(20)


async def test_connect_success(http_server):
    entry, streams = await tcp.connect("127.0.0.1", http_server.port, clock=Clock(), txid=4, timeout=2)
    try:
        assert entry["status"] == {"success": True, "failure": None, "blocked": None}
        assert entry["ip"] == "127.0.0.1" and entry["port"] == http_server.port
        assert entry["transaction_id"] == 4 and entry["t"] >= entry["t0"]
        reader, writer = streams
        writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.")
    finally:
        await tcp.close(streams)


async def test_connect_ipv6_loopback(http_server):
    # The server listens on 127.0.0.1 only, so ::1 is refused: the v6 path still works.
    entry, streams = await tcp.connect("::1", http_server.port, clock=Clock(), txid=1, timeout=2)
    assert streams is None
    assert entry["status"]["failure"] == failures.CONNECTION_REFUSED


async def test_connect_refused():
    entry, streams = await tcp.connect("127.0.0.1", servers.closed_port(), clock=Clock(), txid=1, timeout=2)
    assert streams is None
    assert entry["status"] == {"success": False, "failure": failures.CONNECTION_REFUSED, "blocked": None}


async def test_connect_timeout():
    loop = asyncio.get_running_loop()
    with servers.Blackhole() as port:
        start = loop.time()
        entry, streams = await tcp.connect("127.0.0.1", port, clock=Clock(), txid=1, timeout=0.3)
        elapsed = loop.time() - start
    assert streams is None
    assert entry["status"]["failure"] == failures.GENERIC_TIMEOUT
    assert 0.25 <= elapsed < 2


@pytest.mark.parametrize(
    ("code", "failure"),
    [
        (errno.EHOSTUNREACH, failures.HOST_UNREACHABLE),
        (errno.ENETUNREACH, failures.NETWORK_UNREACHABLE),
        (errno.ECONNRESET, failures.CONNECTION_RESET),
    ],
)
async def test_connect_icmp_errors(monkeypatch, code, failure):
    # Loopback cannot produce ICMP unreachables; the kernel's errno is what we map.
    async def fake(*args, **kwargs):
        raise OSError(code, "patched")

    monkeypatch.setattr(asyncio, "open_connection", fake)
    entry, streams = await tcp.connect("192.0.2.1", 443, clock=Clock(), txid=1, timeout=2)
    assert streams is None
    assert entry["status"]["failure"] == failure


async def test_close_tolerates_none_and_reset(rst_server):
    await tcp.close(None)
    entry, streams = await tcp.connect("127.0.0.1", rst_server.port, clock=Clock(), txid=1, timeout=2)
    streams[1].write(b"hello")
    await asyncio.sleep(0.1)
    await tcp.close(streams)
