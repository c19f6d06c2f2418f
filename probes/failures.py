"""The closed vocabulary of measurement failures (OONI's strings, df-007).

Every probe primitive reports what went wrong with one of these strings, never
with an exception. ``None`` means the operation succeeded.

| failure                      | what happened                                              |
|------------------------------|------------------------------------------------------------|
| ``connection_refused``       | the peer (or a middlebox) answered the SYN with a RST      |
| ``connection_reset``         | an established connection was reset (RST mid-stream)       |
| ``generic_timeout_error``    | the operation did not finish before its deadline           |
| ``eof_error``                | the peer closed the connection cleanly, unexpectedly early |
| ``host_unreachable``         | ICMP host unreachable / no route to host                   |
| ``network_unreachable``      | no route to the network (e.g. an offline probe)            |
| ``dns_nxdomain_error``       | the resolver answered NXDOMAIN                             |
| ``dns_refused_error``        | the resolver answered REFUSED                              |
| ``dns_servfail_error``       | the resolver answered SERVFAIL                             |
| ``dns_no_answer``            | NOERROR but no record of the asked type                    |
| ``dns_temporary_failure``    | getaddrinfo EAI_AGAIN (no resolver reachable, usually)     |
| ``ssl_invalid_hostname``     | the certificate is not valid for the requested name        |
| ``ssl_unknown_authority``    | the chain does not lead to a trusted root                  |
| ``ssl_invalid_certificate``  | expired, not yet valid, or otherwise malformed certificate |
| ``ssl_failed_handshake``     | the TLS handshake failed for another reason (alert, ...)   |
| ``http_request_failed``      | an HTTP exchange failed at the protocol level              |
| ``http_too_many_redirects``  | more redirects than allowed (loops included)               |
| ``http_body_too_large``      | not an error: recorded when a body was truncated at its cap |
| ``http_invalid_redirect``    | a redirect with a Location that cannot be followed         |
| ``address_refused``          | a target refused by policy (the helper's SSRF defence)     |
| ``unknown_failure: <text>``  | anything else, with addresses scrubbed from the text       |

Classification looks at errno before messages, and is idempotent: classifying
an already-classified string returns it unchanged.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import ssl

CONNECTION_REFUSED = "connection_refused"
CONNECTION_RESET = "connection_reset"
GENERIC_TIMEOUT = "generic_timeout_error"
EOF_ERROR = "eof_error"
HOST_UNREACHABLE = "host_unreachable"
NETWORK_UNREACHABLE = "network_unreachable"
DNS_NXDOMAIN = "dns_nxdomain_error"
DNS_REFUSED = "dns_refused_error"
DNS_SERVFAIL = "dns_servfail_error"
DNS_NO_ANSWER = "dns_no_answer"
DNS_TEMPORARY = "dns_temporary_failure"
SSL_INVALID_HOSTNAME = "ssl_invalid_hostname"
SSL_UNKNOWN_AUTHORITY = "ssl_unknown_authority"
SSL_INVALID_CERTIFICATE = "ssl_invalid_certificate"
SSL_FAILED_HANDSHAKE = "ssl_failed_handshake"
HTTP_REQUEST_FAILED = "http_request_failed"
HTTP_TOO_MANY_REDIRECTS = "http_too_many_redirects"
HTTP_INVALID_REDIRECT = "http_invalid_redirect"
ADDRESS_REFUSED = "address_refused"
UNKNOWN_PREFIX = "unknown_failure: "

KNOWN = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and k != "UNKNOWN_PREFIX"
)

# Operations a failure can belong to (OONI's "failed_operation").
RESOLVE = "resolve"
CONNECT = "connect"
DNS_ROUND_TRIP = "dns_round_trip"
TLS_HANDSHAKE = "tls_handshake"
HTTP_ROUND_TRIP = "http_round_trip"
READ = "read"
WRITE = "write"

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


def is_network_down(failure: str | None) -> bool:
    """Failures that say the probe itself has no working network."""
    return failure in (NETWORK_UNREACHABLE, DNS_TEMPORARY)
