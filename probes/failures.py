"""Classify exceptions into the closed failure vocabulary of core/failures.py.

Every probe primitive reports what went wrong with one of those strings, never
with an exception. Classification looks at errno before messages, and is
idempotent: classifying an already-classified string returns it unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import ssl

from core.failures import *  # noqa: F401,F403 -- the vocabulary, as failures.NAME for the primitives
from core.failures import (
    CONNECTION_REFUSED, CONNECTION_RESET, DNS_NO_ANSWER, DNS_NXDOMAIN, DNS_SERVFAIL, DNS_TEMPORARY, EOF_ERROR,
    GENERIC_TIMEOUT, HOST_UNREACHABLE, HTTP_REQUEST_FAILED, KNOWN, NETWORK_UNREACHABLE, SSL_FAILED_HANDSHAKE,
    SSL_INVALID_CERTIFICATE, SSL_INVALID_HOSTNAME, SSL_UNKNOWN_AUTHORITY, UNKNOWN_PREFIX,
)

_ERRNO = {
    errno.ECONNREFUSED: CONNECTION_REFUSED,
    errno.ECONNRESET: CONNECTION_RESET,
    errno.EPIPE: CONNECTION_RESET,
    errno.ECONNABORTED: CONNECTION_RESET,
    errno.ETIMEDOUT: GENERIC_TIMEOUT,
    errno.EHOSTUNREACH: HOST_UNREACHABLE,
    errno.EHOSTDOWN: HOST_UNREACHABLE,
    errno.ENETUNREACH: NETWORK_UNREACHABLE,
    errno.ENETDOWN: NETWORK_UNREACHABLE,
    errno.EADDRNOTAVAIL: NETWORK_UNREACHABLE,
}

_GAI = {
    socket.EAI_NONAME: DNS_NXDOMAIN,
    socket.EAI_AGAIN: DNS_TEMPORARY,
    socket.EAI_FAIL: DNS_SERVFAIL,
}
if hasattr(socket, "EAI_NODATA"):
    _GAI[socket.EAI_NODATA] = DNS_NO_ANSWER

_V4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_V6 = re.compile(r"(?<![\w:])(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F]{0,4}(?![\w:])")


def scrub_addresses(text: str) -> str:
    """Replace every IP address in ``text`` with a placeholder (privacy: error
    strings can carry the probe's own address)."""
    text = _V4.sub("[scrubbed]", text)
    return _V6.sub("[scrubbed]", text)


def _unknown(text: str) -> str:
    text = scrub_addresses(" ".join(str(text).split()))[:200]
    return UNKNOWN_PREFIX + (text or "no message")


def classify_ssl(exc: ssl.SSLError) -> str:
    """TLS errors: certificate verification outcome first, then the rest."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        msg = (getattr(exc, "verify_message", "") or str(exc)).lower()
        if "hostname mismatch" in msg or "ip address mismatch" in msg or code == 62:
            return SSL_INVALID_HOSTNAME
        if code in (2, 18, 19, 20, 21) or "self-signed" in msg or "self signed" in msg or "local issuer" in msg or "unable to get issuer" in msg:
            return SSL_UNKNOWN_AUTHORITY
        return SSL_INVALID_CERTIFICATE
    if isinstance(exc, ssl.SSLEOFError) or "unexpected eof" in str(exc).lower():
        return EOF_ERROR
    if isinstance(exc, ssl.SSLZeroReturnError):
        return EOF_ERROR
    if exc.errno in _ERRNO:
        return _ERRNO[exc.errno]
    return SSL_FAILED_HANDSHAKE


def classify(exc: BaseException | str | None) -> str | None:
    """Map an exception (or an already-classified string) to a failure string."""
    if exc is None:
        return None
    if isinstance(exc, str):
        if exc in KNOWN or exc.startswith(UNKNOWN_PREFIX):
            return exc
        return _unknown(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return GENERIC_TIMEOUT
    if isinstance(exc, socket.gaierror):
        return _GAI.get(exc.errno, _unknown(exc))
    if isinstance(exc, ssl.SSLError):
        return classify_ssl(exc)
    if isinstance(exc, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return CONNECTION_RESET
    if isinstance(exc, asyncio.IncompleteReadError) or isinstance(exc, EOFError):
        return EOF_ERROR
    if isinstance(exc, OSError) and exc.errno in _ERRNO:
        return _ERRNO[exc.errno]
    # Wrapped causes (aiohttp wraps OSError / SSLError in its own exceptions).
    for inner in (getattr(exc, "os_error", None), getattr(exc, "certificate_error", None), exc.__cause__, exc.__context__):
        if isinstance(inner, BaseException) and inner is not exc:
            got = classify(inner)
            if got and not got.startswith(UNKNOWN_PREFIX):
                return got
    library = _classify_aiohttp(exc)
    if library is not None:
        return library
    return _unknown(f"{type(exc).__name__}: {exc}")


def _classify_aiohttp(exc: BaseException) -> str | None:
    """aiohttp's own exceptions that carry no OS error to look at."""
    if not type(exc).__module__.startswith("aiohttp"):
        return None
    import aiohttp  # only here: the rest of this module has no third-party needs

    # A body cut short: aiohttp keeps the transport's error only in the message
    # ("... ConnectionResetError(104, ...)"), and a RST must not read as a FIN.
    if isinstance(exc, aiohttp.ClientPayloadError):
        text = str(exc)
        if "ConnectionResetError" in text or "Connection reset" in text:
            return CONNECTION_RESET
        return EOF_ERROR
    # The server closed the connection before sending a response.
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return EOF_ERROR
    # Malformed status line, headers or framing.
    if isinstance(exc, aiohttp.ClientResponseError):
        return HTTP_REQUEST_FAILED
    return None
