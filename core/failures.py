"""The closed vocabulary of measurement failures (OONI's strings, df-007).

probes/failures.py maps exceptions onto these strings; the helper and the
analysis read them from here.

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

"""

from __future__ import annotations


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

# Failures that say there is no route to an address (or its family, e.g. a
# probe without IPv6): never evidence that the address is blocked.
UNROUTABLE = frozenset({NETWORK_UNREACHABLE, HOST_UNREACHABLE})
# ...and with getaddrinfo's EAI_AGAIN, what a probe with no network at all sees
# on every step (the runner's "network is unreachable" test). A censor that
# drops DNS produces DNS_TEMPORARY too, so the analysis uses UNROUTABLE.
OFFLINE = UNROUTABLE | {DNS_TEMPORARY}
