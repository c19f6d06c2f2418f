"""Shared fixtures: loopback servers from ``servers.py`` and a test clock.

Every server binds 127.0.0.1 only; no test reaches another address or the
machine's configured resolver.
"""

from __future__ import annotations

import pytest

import servers
from probes.records import Clock, Transactions


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> servers.PKI:
    """Test CA (trusted via ``pki.ca_file``), rogue CA, and server certificates."""
    return servers.PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def transactions() -> Transactions:
    return Transactions()


@pytest.fixture
async def dns_server():
    """UDP DNS server; program names with ``dns_server.program(name, ...)``."""
    async with servers.DNSServer() as server:
        yield server


@pytest.fixture
async def http_server():
    async with servers.WebServer() as server:
        yield server


@pytest.fixture
async def https_server(pki: servers.PKI):
    """HTTPS site with a certificate for localhost / 127.0.0.1 from the test CA."""
    async with servers.WebServer(ssl_context=pki.server_context(pki.good)) as server:
        yield server


@pytest.fixture
async def rst_server():
    """Resets (RST) each connection after reading its first bytes."""
    async with servers.RawServer("rst") as server:
        yield server


@pytest.fixture
async def eof_server():
    """Closes each connection cleanly (FIN) after reading its first bytes."""
    async with servers.RawServer("eof") as server:
        yield server


@pytest.fixture
async def silent_server():
    """Accepts connections and never sends a byte."""
    async with servers.RawServer("silent") as server:
        yield server


@pytest.fixture
async def expired_server(pki: servers.PKI):
    async with servers.RawServer("tls", pki.server_context(pki.expired)) as server:
        yield server


@pytest.fixture
async def unknown_ca_server(pki: servers.PKI):
    async with servers.RawServer("tls", pki.server_context(pki.unknown_authority)) as server:
        yield server


@pytest.fixture
async def wrong_host_server(pki: servers.PKI):
    async with servers.RawServer("tls", pki.server_context(pki.wrong_host)) as server:
        yield server


@pytest.fixture
async def good_tls_server(pki: servers.PKI):
    async with servers.RawServer("tls", pki.server_context(pki.good)) as server:
        yield server
