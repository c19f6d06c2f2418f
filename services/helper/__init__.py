"""The control helper: OONI's Web Connectivity test-helper protocol (ts-017).

A probe POSTs ``{http_request, http_request_headers, tcp_connect}``; the helper
measures the same URL from its own (uncensored) network — DNS, TCP to the
probe's endpoints and to its own addresses, TLS, the HTTP fetch — and answers
with ``{dns, tcp_connect, tls_handshake, http_request, ip_info, ...}`` plus
Vantage's ``x_`` fields (docs/helper.md documents every field).

It is an open fetcher by design, so it defends itself: every address is checked
against core.net.Policy before any connection (after DNS, on each redirect,
for probe-supplied endpoints), sizes and time are capped, load beyond
``max_inflight`` is shed with 503, and each client address gets a token bucket
keyed by a salted hash (the address itself is never stored nor logged).

One job per module:

- config.py: ``HelperConfig`` (options and config file keys), ``--listen`` parsing;
- protocol.py: the request (parsing, validation) and the answer's section shapes;
- measure.py: one control measurement (DNS, TCP/TLS, the redirect chain);
- throughput.py: the ``x_throughput`` timed download and its time bounds;
- page.py: title, hashes and simhash of a fetched page;
- asn.py: ``ip_info.asn`` from a MaxMind ASN database;
- limits.py: client key, rate limit, in-flight limit, bounded body read;
- log.py: logging through a queue and a writer thread, the summary a minute;
- app.py: the aiohttp application, /health, serving.
"""

from __future__ import annotations

from .app import Helper, serve_forever, start
from .config import HelperConfig
from .limits import RateLimiter
from .page import simhash
from .protocol import (
    FLAG_BOGON, FLAG_RESOLVED_BY_PROBE, FLAG_RESOLVED_BY_TH, FLAG_VALID_FOR_DOMAIN, BadRequest, ControlRequest,
    parse_request,
)

__all__ = [
    "FLAG_BOGON", "FLAG_RESOLVED_BY_PROBE", "FLAG_RESOLVED_BY_TH", "FLAG_VALID_FOR_DOMAIN", "BadRequest",
    "ControlRequest", "Helper", "HelperConfig", "RateLimiter", "parse_request", "serve_forever", "simhash", "start",
]
