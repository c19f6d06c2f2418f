"""The failure vocabulary: mapping from exceptions, idempotence, scrubbing."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import aiohttp
import pytest

from probes import failures


@pytest.mark.parametrize("value", sorted(failures.KNOWN))
def test_known_strings_are_idempotent(value):
    assert failures.classify(value) == value
    assert failures.classify(failures.classify(value)) == value


def test_unknown_is_idempotent_and_scrubbed():
    first = failures.classify("weird thing from 10.1.2.3 and 2001:db8::1")
    assert first.startswith(failures.UNKNOWN_PREFIX)
    assert "10.1.2.3" not in first and "2001:db8::1" not in first
    assert failures.classify(first) == first


def test_none_is_success():
    assert failures.classify(None) is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), failures.CONNECTION_REFUSED),
        (ConnectionResetError(errno.ECONNRESET, "reset"), failures.CONNECTION_RESET),
        (BrokenPipeError(errno.EPIPE, "pipe"), failures.CONNECTION_RESET),
        (OSError(errno.EHOSTUNREACH, "no route"), failures.HOST_UNREACHABLE),
        (OSError(errno.ENETUNREACH, "unreachable"), failures.NETWORK_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "timed out"), failures.GENERIC_TIMEOUT),
        (asyncio.TimeoutError(), failures.GENERIC_TIMEOUT),
        (TimeoutError(), failures.GENERIC_TIMEOUT),
        (asyncio.IncompleteReadError(b"", 10), failures.EOF_ERROR),
        (EOFError("closed"), failures.EOF_ERROR),
        (socket.gaierror(socket.EAI_NONAME, "no name"), failures.DNS_NXDOMAIN),
        (socket.gaierror(socket.EAI_AGAIN, "again"), failures.DNS_TEMPORARY),
        (socket.gaierror(socket.EAI_FAIL, "fail"), failures.DNS_SERVFAIL),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), failures.EOF_ERROR),
        (ssl.SSLError(1, "[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] alert"), failures.SSL_FAILED_HANDSHAKE),
    ],
)
def test_exceptions(exc, expected):
    assert failures.classify(exc) == expected


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (62, "hostname mismatch, certificate is not valid for 'x.test'.", failures.SSL_INVALID_HOSTNAME),
        (64, "IP address mismatch, certificate is not valid for '192.0.2.1'.", failures.SSL_INVALID_HOSTNAME),
        (20, "unable to get local issuer certificate", failures.SSL_UNKNOWN_AUTHORITY),
        (18, "self-signed certificate", failures.SSL_UNKNOWN_AUTHORITY),
        (19, "self-signed certificate in certificate chain", failures.SSL_UNKNOWN_AUTHORITY),
        (10, "certificate has expired", failures.SSL_INVALID_CERTIFICATE),
        (9, "certificate is not yet valid", failures.SSL_INVALID_CERTIFICATE),
    ],
)
def test_certificate_verification(code, message, expected):
    assert failures.classify(_verify_error(code, message)) == expected


def test_wrapped_causes():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert failures.classify(outer) == failures.CONNECTION_RESET


def test_aiohttp_exceptions():
    key = aiohttp.client_reqrep.ConnectionKey("h", 443, True, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert failures.classify(refused) == failures.CONNECTION_REFUSED
    assert failures.classify(aiohttp.ServerDisconnectedError()) == failures.EOF_ERROR
    assert failures.classify(aiohttp.ClientPayloadError("Response payload is not completed")) == failures.EOF_ERROR
    reset = aiohttp.ClientPayloadError("Response payload is not completed: ... ConnectionResetError(104, 'x')")
    assert failures.classify(reset) == failures.CONNECTION_RESET
    assert failures.classify(aiohttp.ServerTimeoutError("read")) == failures.GENERIC_TIMEOUT


def test_unknown_exception_scrubbed():
    got = failures.classify(ValueError("bad value from 203.0.113.9"))
    assert got == failures.UNKNOWN_PREFIX + "ValueError: bad value from [scrubbed]"


def test_offline_sets():
    assert failures.UNROUTABLE == {"network_unreachable", "host_unreachable"}
    assert failures.OFFLINE == failures.UNROUTABLE | {"dns_temporary_failure"}
