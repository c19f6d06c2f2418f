"""TLS handshake primitive against loopback servers with good and bad certificates."""

from __future__ import annotations

import hashlib
import ssl

import pytest

import servers

from probes import failures, tls
from probes.records import Clock

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def context(pki):
    return tls.make_context(pki.ca_file)


async def shake(port, context, server_name="localhost", timeout=2.0):
    return await tls.handshake("127.0.0.1", port, server_name, context=context, clock=Clock(), txid=5, timeout=timeout)


async def test_handshake_ok(good_tls_server, context, pki):
    entry = await shake(good_tls_server.port, context)
    assert entry["failure"] is None
    assert entry["address"] == f"127.0.0.1:{good_tls_server.port}"
    assert entry["server_name"] == "localhost"
    assert entry["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert entry["cipher_suite"]
    assert entry["negotiated_protocol"] == "http/1.1" or entry["negotiated_protocol"] is None
    assert entry["x_cert_valid"] is True and entry["x_cert_error"] is None
    assert entry["x_cert_sha256"] == hashlib.sha256(der_of(pki.good)).hexdigest()
    assert len(entry["peer_certificates"]) == 1
    assert entry["transaction_id"] == 5


def der_of(leaf) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def test_handshake_ip_server_name(good_tls_server, context):
    # An IP as server name is verified against the certificate's IP SAN.
    entry = await shake(good_tls_server.port, context, server_name="127.0.0.1")
    assert entry["failure"] is None and entry["x_cert_valid"] is True


async def test_handshake_aiohttp_site(https_server, context):
    entry = await shake(https_server.port, context)
    assert entry["failure"] is None


async def test_without_extra_ca_unknown_authority(good_tls_server):
    entry = await shake(good_tls_server.port, tls.make_context())
    assert entry["failure"] == failures.SSL_UNKNOWN_AUTHORITY


async def test_certificate_failures_capture_presented_cert(bad_cert_case, context):
    server, leaf, failure = bad_cert_case
    entry = await shake(server.port, context)
    assert entry["failure"] == failure
    # The second, unverified handshake recorded what the server showed.
    assert entry["x_cert_valid"] is False
    assert entry["x_cert_error"] == failure
    assert entry["x_cert_sha256"] == hashlib.sha256(der_of(leaf)).hexdigest()
    assert entry["x_cert_subject"] is not None and entry["x_cert_not_after"]
    assert len(entry["peer_certificates"]) == 1
    assert server.connections == 1  # the server sees only handshakes that complete: the unverified one


async def test_reset_after_client_hello(rst_server, context):
    entry = await shake(rst_server.port, context)
    assert entry["failure"] == failures.CONNECTION_RESET
    assert entry["x_cert_valid"] is None and entry["peer_certificates"] == []
    assert entry["tls_version"] is None


async def test_eof_after_client_hello(eof_server, context):
    entry = await shake(eof_server.port, context)
    assert entry["failure"] == failures.EOF_ERROR


async def test_silent_server_times_out(silent_server, context):
    entry = await shake(silent_server.port, context, timeout=0.3)
    assert entry["failure"] == failures.GENERIC_TIMEOUT
    assert entry["t"] - entry["t0"] < 1.5


async def test_connection_refused(context):
    entry = await shake(servers.closed_port(), context)
    assert entry["failure"] == failures.CONNECTION_REFUSED


def test_make_context_adds_extra_ca(pki):
    base = len(tls.make_context().get_ca_certs())
    context = tls.make_context(pki.ca_file)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == base + 1


async def test_the_whole_presented_chain_is_recorded(tmp_path):
    import base64

    import trustme
    from cryptography import x509

    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(server_ctx)  # sends the leaf and the intermediate
    ca_file = tmp_path / "root.pem"
    root.cert_pem.write_to_path(str(ca_file))
    async with servers.RawServer("tls", server_ctx) as server:
        entry = await shake(server.port, tls.make_context(str(ca_file)))
    assert entry["failure"] is None and entry["x_cert_valid"] is True
    chain = [x509.load_der_x509_certificate(base64.b64decode(c["data"])) for c in entry["peer_certificates"]]
    assert len(chain) == 2
    assert chain[0].issuer == chain[1].subject  # leaf first, then its issuer
