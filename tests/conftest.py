"""Shared fixtures: loopback servers from ``servers.py`` and a test clock.

Every server binds 127.0.0.1 only; no test reaches another address or the
machine's configured resolver.
"""

from __future__ import annotations

import pytest

import servers
from core import failures
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


def _raw_server(mode: str, doc: str, leaf: str | None = None):
    """A fixture serving one ``servers.RawServer(mode)``; a TLS one presents
    the certificate ``pki.<leaf>``."""

    async def fixture(request: pytest.FixtureRequest):
        context = None
        if leaf is not None:
            pki = request.getfixturevalue("pki")
            context = pki.server_context(getattr(pki, leaf))
        async with servers.RawServer(mode, context) as server:
            yield server

    fixture.__doc__ = doc
    return pytest.fixture(fixture)


rst_server = _raw_server("rst", "Resets (RST) each connection after reading its first bytes.")
eof_server = _raw_server("eof", "Closes each connection cleanly (FIN) after reading its first bytes.")
silent_server = _raw_server("silent", "Accepts connections and never sends a byte.")
expired_server = _raw_server("tls", "TLS with an expired certificate from the test CA.", "expired")
unknown_ca_server = _raw_server("tls", "TLS with a certificate from the rogue (untrusted) CA.", "unknown_authority")
wrong_host_server = _raw_server("tls", "TLS with a test-CA certificate for another name.", "wrong_host")
good_tls_server = _raw_server("tls", "TLS with a valid test-CA certificate for localhost / 127.0.0.1.", "good")


@pytest.fixture(
    params=[
        ("expired", failures.SSL_INVALID_CERTIFICATE),
        ("unknown_authority", failures.SSL_UNKNOWN_AUTHORITY),
        ("wrong_host", failures.SSL_INVALID_HOSTNAME),
    ],
    ids=lambda p: p[0],
)
async def bad_cert_case(request, pki):
    """A TLS server presenting one kind of bad certificate: (server, leaf, the failure a client must report)."""
    name, failure = request.param
    leaf = getattr(pki, name)
    async with servers.RawServer("tls", pki.server_context(leaf)) as server:
        yield server, leaf, failure


@pytest.fixture
async def serve_app():
    """``base = await serve_app(app)``: the aiohttp ``app`` on 127.0.0.1, an
    ephemeral port, base URL ``http://127.0.0.1:PORT``, until the test ends."""
    runners = []

    async def serve(app) -> str:
        runner, base = await servers.serve_app(app)
        runners.append(runner)
        return base

    yield serve
    for runner in reversed(runners):
        await runner.cleanup()
