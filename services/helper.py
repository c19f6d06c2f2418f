"""The control helper: OONI's Web Connectivity test-helper protocol (ts-017).

A probe POSTs ``{http_request, http_request_headers, tcp_connect}``; the helper
measures the same URL from its own (uncensored) network — DNS, TCP to the
probe's endpoints and to its own addresses, TLS, the HTTP fetch — and answers
with ``{dns, tcp_connect, tls_handshake, http_request, ip_info, ...}`` plus
Vantage's ``x_`` fields (docs/helper.md documents every field).

It is an open fetcher by design, so it defends itself: every address is checked
against services/ssrf.py before any connection (after DNS, on each redirect,
for probe-supplied endpoints), sizes and time are capped, load beyond
``max_inflight`` is shed with 503, and each client address gets a token bucket
keyed by a salted hash (the address itself is never stored nor logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from aiohttp import web

from probes import dns, failures, http, tcp, tls
from probes.flatten import extract_title, split_endpoint
from probes.records import SOFTWARE_VERSION, Clock, Transactions, body_bytes
from probes.timeouts import Timeouts

from core.net import Policy, parse_ip

log = logging.getLogger("vantage.helper")
# aiohttp's server logger names the client address on malformed requests;
# we promise never to log client addresses.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL + 1)

MAX_RESOLVED_ADDRESSES = 8

# ip_info flags (a bitmask, same meaning as OONI's TH).
FLAG_RESOLVED_BY_PROBE = 1  # the address is in the probe's tcp_connect list
FLAG_RESOLVED_BY_TH = 2  # the helper's own lookup returned it
FLAG_BOGON = 4  # not a public address (and not allow-listed by the operator)
FLAG_VALID_FOR_DOMAIN = 8  # the helper completed a verified TLS handshake for the domain with it

# Request headers a probe may pass on to the fetch. Anything else (Host,
# Cookie, Authorization, hop-by-hop headers) would let a client steer the
# helper's request beyond "fetch this URL like a browser".
FORWARDED_HEADERS = ("User-Agent", "Accept", "Accept-Language")
DEFAULT_USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Connect-level failures after which the next address of the host is tried.
_TRY_NEXT_ADDRESS = frozenset({
    failures.CONNECTION_REFUSED, failures.GENERIC_TIMEOUT, failures.HOST_UNREACHABLE, failures.NETWORK_UNREACHABLE,
})
_MAX_ADDRESSES_PER_HOP = 3
_MAX_URL = 4096
_BODY_READ_SECONDS = 10.0
_MAX_THROUGHPUT_SECONDS = 10.0
_MAX_THROUGHPUT_BYTES = 64 * 1024 * 1024
# An x_throughput request is answered within ``seconds`` + setup + close from
# its arrival (probes/throttling.py HELPER_OVERHEAD is their sum): DNS,
# connect, TLS and sending the request must fit in the setup allowance, the
# timed part is ``seconds`` from the request, closing takes at most 1 s.
_THROUGHPUT_SETUP_SECONDS = 5.0
_THROUGHPUT_CLOSE_SECONDS = 1.0
# The sample's own bounds end this much before the answer's, so event-loop lag
# never lets the request deadline cut a finished sample.
_THROUGHPUT_MARGIN = 0.5
# With x_throughput, the page fetch reads only this much of the body (enough
# for the title and a fingerprint of its start): the timed download stands in
# for the rest, and a full 512 KiB fetch would compete with it for bandwidth.
_THROUGHPUT_FETCH_BODY = 32 * 1024


@dataclass
class HelperConfig:
    listen: str = "127.0.0.1:8080"
    allow: list[str] = field(default_factory=list)  # CIDRs exempt from the SSRF policy
    max_inflight: int = 50
    rate_per_minute: int = 300  # per client address; 0 disables
    resolver: str | None = None  # "ip[:port]" UDP resolver; None = system resolver
    doh_url: str | None = None  # optional DoH lookup reported in x_doh
    ca_file: str | None = None  # extra trusted CA (the lab's)
    asn_db: str | None = None  # directory holding a MaxMind ASN .mmdb
    trust_forwarded_for: bool = False  # behind a reverse proxy: client = last X-Forwarded-For entry
    max_request_body: int = 64 * 1024
    max_response_body: int = 512 * 1024
    max_redirects: int = 10
    max_endpoints: int = 32
    request_timeout: float = 30.0  # total time for one control request
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(dns=5.0, connect=8.0, tls=8.0, http=15.0))

    KEYS = ("listen", "allow", "max_inflight", "rate_per_minute", "resolver", "doh_url", "ca_file", "asn_db",
            "trust_forwarded_for", "max_request_body", "max_response_body", "max_redirects", "max_endpoints",
            "request_timeout")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "HelperConfig":
        """Build from a config file's table (keys as in KEYS, dashes allowed)."""
        known = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(known) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown helper config keys: {', '.join(unknown)}")
        return cls(**known)


class BadRequest(Exception):
    """A request the helper refuses to measure; answered 400 with the reason."""


# --- request validation ------------------------------------------------------------


@dataclass
class ControlRequest:
    url: str
    scheme: str
    host: str  # hostname (IDNA) or canonical IP literal
    host_ip: str | None  # set when the URL host is an IP literal
    port: int
    headers: dict[str, str]
    endpoints: list[str]  # as the probe spelled them (response keys)
    throughput: dict[str, float] | None


def _format_endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _normalize_url(url: str) -> tuple[str, str, str, str | None, int]:
    """(url, scheme, host, host_ip, port) with odd IPv4 hosts rewritten to the
    dotted quad they stand for (as browsers do), so what is checked is what is
    fetched."""
    if not isinstance(url, str) or not url or len(url) > _MAX_URL:
        raise BadRequest("http_request must be a URL string")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("http_request must be an http:// or https:// URL with a host")
    hostname = parts.hostname.rstrip(".") if not parts.hostname.startswith("[") else parts.hostname
    ip = parse_ip(hostname)
    port = port or (443 if scheme == "https" else 80)
    if ip is not None:
        host = str(ip)
        host_ip: str | None = host
        netloc_host = f"[{host}]" if ip.version == 6 else host
    else:
        try:
            host = hostname.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise BadRequest("invalid hostname") from None
        host_ip = None
        netloc_host = host
    netloc = netloc_host if parts.port is None else f"{netloc_host}:{parts.port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), scheme, host, host_ip, port


def parse_request(data: Any, config: HelperConfig) -> ControlRequest:
    if not isinstance(data, dict):
        raise BadRequest("request must be a JSON object")
    if "http_request" not in data:
        raise BadRequest("missing field: http_request")
    if "tcp_connect" not in data:
        raise BadRequest("missing field: tcp_connect")
    url, scheme, host, host_ip, port = _normalize_url(data["http_request"])

    raw_headers = data.get("http_request_headers")
    raw_headers = {} if raw_headers is None else raw_headers
    if not isinstance(raw_headers, dict):
        raise BadRequest("http_request_headers must be an object of name -> [values]")
    headers: dict[str, str] = {}
    for name, value in raw_headers.items():
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise BadRequest("http_request_headers values must be strings")
            value = value[0] if value else ""
        if not isinstance(value, str):
            raise BadRequest("http_request_headers values must be strings")
        for allowed in FORWARDED_HEADERS:
            if isinstance(name, str) and name.lower() == allowed.lower():
                headers[allowed] = re.sub(r"[\r\n\x00]", " ", value)[:512]
    headers.setdefault("User-Agent", DEFAULT_USER_AGENT)

    endpoints = data["tcp_connect"]
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise BadRequest("tcp_connect must be a list of \"ip:port\" strings")
    if len(endpoints) > config.max_endpoints:
        raise BadRequest(f"too many tcp_connect endpoints (max {config.max_endpoints})")
    for endpoint in endpoints:
        try:
            ip_text, ep_port = split_endpoint(endpoint)
        except ValueError:  # "1.2.3.4:abc"
            raise BadRequest(f"invalid tcp_connect endpoint: {endpoint[:64]!r}") from None
        if ep_port is None or not 0 < ep_port < 65536 or parse_ip(ip_text) is None:
            raise BadRequest(f"invalid tcp_connect endpoint: {endpoint[:64]!r}")

    throughput = data.get("x_throughput")
    if throughput is not None:
        if not isinstance(throughput, dict):
            raise BadRequest("x_throughput must be an object")
        seconds, max_bytes = throughput.get("seconds", 3), throughput.get("max_bytes", 16 * 1024 * 1024)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= _MAX_THROUGHPUT_SECONDS:
            raise BadRequest(f"x_throughput.seconds must be a number in (0, {_MAX_THROUGHPUT_SECONDS:g}]")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise BadRequest("x_throughput.max_bytes must be a positive integer")
        throughput = {"seconds": float(seconds), "max_bytes": min(max_bytes, _MAX_THROUGHPUT_BYTES)}
    return ControlRequest(url, scheme, host, host_ip, port, headers, list(dict.fromkeys(endpoints)), throughput)


# --- body fingerprint --------------------------------------------------------------


def simhash(body: bytes, shingle: int = 3) -> str:
    """64-bit simhash of the body's word shingles, as 16 hex digits. Pages that
    differ only in a timestamp or a token keep most bits, so analysis can tell
    "same page, dynamic bits" from "a different page" (a blockpage)."""
    # The first 64 KiB say which page this is; hashing 512 KiB of one-letter
    # words costs seconds of event-loop time.
    words = re.findall(r"\w+", body[:65536].decode("utf-8", "replace").lower())
    if not words:
        return "0" * 16
    grams = [" ".join(words[i:i + shingle]) for i in range(max(1, len(words) - shingle + 1))]
    weights = [0] * 64
    for gram in grams:
        value = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if value >> bit & 1 else -1
    result = 0
    for bit in range(64):
        if weights[bit] > 0:
            result |= 1 << bit
    return f"{result:016x}"


# --- ASN lookup --------------------------------------------------------------------


class AsnLookup:
    """ASN of an address from a MaxMind-format ASN database (GeoLite2-ASN or
    compatible) found in a directory; 0 when not configured or not found."""

    def __init__(self, directory: str | None):
        self._reader = None
        if not directory:
            return
        candidates = sorted(p for p in Path(directory).glob("*.mmdb") if "asn" in p.name.lower())
        if not candidates:
            raise ValueError(f"no ASN .mmdb file in {directory}")
        import maxminddb

        self._reader = maxminddb.open_database(str(candidates[0]))

    def __call__(self, ip: str) -> int:
        if self._reader is None:
            return 0
        try:
            record = self._reader.get(ip)
        except ValueError:
            return 0
        return int((record or {}).get("autonomous_system_number") or 0)


# --- rate limiting -----------------------------------------------------------------


class RateLimiter:
    """Token bucket per client, keyed by a keyed hash of the client address.

    The key (random per process) makes the stored digests useless for recovering
    addresses — there are only 2^32 IPv4 addresses, so an unkeyed hash would not
    protect anyone — and unlinkable across restarts. Each bucket holds a
    minute's worth of requests and refills continuously.
    """

    MAX_CLIENTS = 100_000

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._salt = os.urandom(32)
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # digest -> (tokens, updated)

    def _key(self, address: str) -> bytes:
        # An IPv6 client owns at least a /64: one bucket per /64, or rotating
        # addresses would escape the limit.
        try:
            ip = ipaddress.ip_address(address)
            if ip.version == 6:
                address = str(ipaddress.ip_network(f"{ip}/64", strict=False))
        except ValueError:
            pass
        return hmac.new(self._salt, address.encode(), hashlib.sha256).digest()[:16]

    def _prune(self, now: float) -> None:
        # A bucket idle long enough to be full again carries no information.
        full_after = self.capacity / self.rate if self.rate else 0
        for key in [k for k, (_, updated) in self._buckets.items() if now - updated >= full_after]:
            del self._buckets[key]

    def allow(self, address: str) -> tuple[bool, float]:
        """(allowed, seconds until the next token when refused)."""
        if self.capacity <= 0:
            return True, 0.0
        now = self._clock()
        key = self._key(address)
        tokens, updated = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False, (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_CLIENTS:
            self._prune(now)
            # Still full (clients rotating faster than buckets refill): drop
            # the oldest half; dicts keep insertion order.
            if len(self._buckets) > self.MAX_CLIENTS:
                for stale in list(self._buckets)[: len(self._buckets) // 2]:
                    del self._buckets[stale]
        return True, 0.0

    def __len__(self) -> int:
        return len(self._buckets)


# --- the measurement ---------------------------------------------------------------


def _failed_http(url: str, failure: str) -> dict[str, Any]:
    return {
        "body_length": -1, "discovered_h3_endpoint": "", "failure": failure, "title": "", "headers": {},
        "status_code": -1, "x_final_url": url, "x_body_sha256": None, "x_body_truncated": False,
        "x_body_simhash": None,
    }


def _tls_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A probes.tls handshake record in the TH response's shape."""
    return {
        "server_name": entry["server_name"],
        "status": entry["failure"] is None,
        "failure": entry["failure"],
        "x_tls_version": entry.get("tls_version"),
        "x_cipher_suite": entry.get("cipher_suite"),
        "x_cert_valid": entry.get("x_cert_valid"),
        "x_cert_error": entry.get("x_cert_error"),
        "x_cert_subject": entry.get("x_cert_subject"),
        "x_cert_issuer": entry.get("x_cert_issuer"),
        "x_cert_sha256": entry.get("x_cert_sha256"),
        "x_cert_not_after": entry.get("x_cert_not_after"),
    }


def _refused_tls(server_name: str) -> dict[str, Any]:
    return _tls_entry({"server_name": server_name, "failure": failures.ADDRESS_REFUSED})


class Measurer:
    """Runs one control measurement; shared, read-only state across requests."""

    def __init__(self, config: HelperConfig):
        self.config = config
        self.policy = Policy.from_cidrs(config.allow)
        self.context = tls.make_context(config.ca_file)
        self.asn = AsnLookup(config.asn_db)

    async def resolve(self, host: str, clock: Clock, txids: Transactions) -> tuple[list[str], str | None]:
        """The helper's own lookup: A and AAAA, via the configured UDP resolver
        or getaddrinfo. Returns (addresses, failure)."""
        t = self.config.timeouts
        if self.config.resolver:
            results = await asyncio.gather(*(
                dns.udp_lookup(host, self.config.resolver, qtype, clock=clock, txid=txids.next(), timeout=t.dns, linger=0.0)
                for qtype in ("A", "AAAA")
            ))
            queries = [q for result in results for q in result]
        else:
            queries = [await dns.system_lookup(host, clock=clock, txid=txids.next(), timeout=t.dns)]
        addrs = dns.first_addresses(queries)
        if addrs:
            return addrs, None
        # Report the A lookup's failure: an AAAA-less domain is not a failure.
        return [], next((q["failure"] for q in queries if q["failure"]), failures.DNS_NO_ANSWER)

    async def doh(self, host: str, clock: Clock, txids: Transactions) -> list[dict[str, Any]]:
        import aiohttp

        if not self.config.doh_url:
            return []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.context)) as session:
            return list(await asyncio.gather(*(
                dns.doh_lookup(host, self.config.doh_url, qtype, session=session, clock=clock, txid=txids.next(),
                               timeout=self.config.timeouts.dns)
                for qtype in ("A", "AAAA")
            )))

    async def _connect(self, ip: str, port: int, server_name: str | None, clock: Clock, txids: Transactions
                       ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """TCP (and TLS when server_name is given) to an address already checked."""
        t = self.config.timeouts
        entry, streams = await tcp.connect(ip, port, clock=clock, txid=txids.next(), timeout=t.connect)
        await tcp.close(streams)
        tcp_result = {"status": entry["status"]["success"], "failure": entry["status"]["failure"]}
        if server_name is None:
            return tcp_result, None
        if not tcp_result["status"]:
            return tcp_result, _tls_entry({"server_name": server_name, "failure": tcp_result["failure"]})
        hs = await tls.handshake(ip, port, server_name, context=self.context, clock=clock, txid=txids.next(), timeout=t.tls)
        return tcp_result, _tls_entry(hs)

    async def _fetch_chain(self, req: ControlRequest, first_addrs: list[str], first_failure: str | None,
                           clock: Clock, txids: Transactions, out: dict[str, Any], max_body: int | None = None) -> None:
        """Follow redirects hop by hop, checking each hop's addresses against
        the policy before connecting, and pinning the connection to the checked
        address. Writes the final outcome into ``out['http']``."""
        url = req.url
        cookies: dict[str, dict[str, str]] = {}
        for index in range(self.config.max_redirects + 1):
            out["final_url"] = url
            parts = urlsplit(url)
            host = parts.hostname or ""
            ip_literal = parse_ip(host)
            if index == 0:
                addrs, failure = first_addrs, first_failure
            elif ip_literal is not None:
                addrs, failure = [str(ip_literal)], None
            else:
                addrs, failure = await self.resolve(host.encode("idna").decode("ascii").lower(), clock, txids)
            if failure or not addrs:
                out["http"] = _failed_http(url, failure or failures.DNS_NO_ANSWER)
                return
            allowed = [d.address for d in map(self.policy.check, addrs) if d.allowed]
            if not allowed:
                out["http"] = _failed_http(url, failures.ADDRESS_REFUSED)
                return
            headers = dict(req.headers)
            jar = cookies.get(host.lower())
            if jar:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in jar.items())
            entry: dict[str, Any] | None = None
            for ip in allowed[:_MAX_ADDRESSES_PER_HOP]:
                entries = await http.fetch(
                    url, clock=clock, transactions=txids, timeouts=self.config.timeouts, context=self.context,
                    pinned={host: ip}, max_redirects=0,
                    max_body=self.config.max_response_body if max_body is None else max_body,
                    headers=headers, events=[],
                )
                entry = entries[-1] if entries else None
                out["final_ip"] = ip
                if entry is None or entry.get("failure") not in _TRY_NEXT_ADDRESS:
                    break
            if entry is None:
                out["http"] = _failed_http(url, failures.HTTP_REQUEST_FAILED)
                return
            response = entry.get("response") or {}
            code = response.get("code")
            if entry.get("failure") and not response:
                out["http"] = _failed_http(url, entry["failure"])
                return
            location = _header(response.get("headers"), "Location")
            if code in REDIRECT_CODES and location:
                _remember_cookies(cookies, host.lower(), response)
                next_url = urljoin(url, location.strip())
                try:
                    url = _normalize_url(next_url)[0]
                except BadRequest:
                    out["http"] = _failed_http(next_url[:_MAX_URL], failures.HTTP_INVALID_REDIRECT)
                    return
                continue
            body = body_bytes(response.get("body"))
            headers_out = response.get("headers") or {}
            out["http"] = {
                "body_length": entry.get("x_body_length", len(body)),
                "discovered_h3_endpoint": "",
                # A failure after the headers (reset mid-body, deadline) still
                # matters to the comparison; a truncated body is not a failure.
                "failure": entry.get("failure"),
                "title": entry.get("x_title") or extract_title(body) or "",
                "headers": {str(k): (", ".join(v) if isinstance(v, list) else str(v)) for k, v in headers_out.items()},
                "status_code": code if code is not None else -1,
                "x_final_url": url,
                "x_body_sha256": entry.get("x_body_sha256") or hashlib.sha256(body).hexdigest(),
                "x_body_truncated": bool(response.get("body_is_truncated")),
                "x_body_simhash": simhash(body),
            }
            return
        out["http"] = _failed_http(url, failures.HTTP_TOO_MANY_REDIRECTS)

    async def measure(self, req: ControlRequest) -> dict[str, Any]:
        clock, txids = Clock(), Transactions()
        server_name = req.host
        tls_ports = {req.port} if req.scheme == "https" else set()
        tls_ports.add(443)  # probes validate addresses over 443 even for http:// URLs (ts-017 E001)

        tcp_out: dict[str, dict[str, Any]] = {}
        tls_out: dict[str, dict[str, Any]] = {}
        probe_ips: set[str] = set()
        state: dict[str, Any] = {}
        tasks: list[asyncio.Task] = []
        pending_keys: dict[asyncio.Task, tuple[str, bool]] = {}
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.config.request_timeout
        fetch_body = None
        if req.throughput is not None:
            # The whole answer is bounded by the timed download's own bound:
            # a slow site must not make the probe's control request time out.
            budget = min(budget, req.throughput["seconds"] + _THROUGHPUT_SETUP_SECONDS + _THROUGHPUT_CLOSE_SECONDS)
            fetch_body = min(self.config.max_response_body, _THROUGHPUT_FETCH_BODY)

        def start_endpoint(key: str, ip_text: str, port: int) -> None:
            wants_tls = port in tls_ports
            decision = self.policy.check(ip_text)
            if not decision.allowed:
                tcp_out[key] = {"status": False, "failure": failures.ADDRESS_REFUSED}
                if wants_tls:
                    tls_out[key] = _refused_tls(server_name)
                return

            async def run() -> None:
                tcp_result, tls_result = await self._connect(decision.address, port, server_name if wants_tls else None, clock, txids)
                tcp_out[key] = tcp_result
                if tls_result is not None:
                    tls_out[key] = tls_result

            task = asyncio.ensure_future(run())
            pending_keys[task] = (key, wants_tls)
            tasks.append(task)

        # Probe endpoints do not depend on our DNS: start them right away.
        seen: set[tuple[str, int]] = set()
        for endpoint in req.endpoints:
            ip_text, port = split_endpoint(endpoint)
            ip = parse_ip(ip_text)
            canonical = self.policy.check_ip(ip).address
            probe_ips.add(canonical)
            seen.add((canonical, port))
            start_endpoint(endpoint, ip_text, port)

        async def dns_then_rest() -> None:
            if req.host_ip is not None:
                addrs, failure = [req.host_ip], None
            else:
                addrs, failure = await self.resolve(req.host, clock, txids)
            state["dns"] = {"failure": failure, "addrs": addrs}
            # Bounded like the probe's (MAX_ADDRESSES): a name with thousands of
            # records must not turn one request into a connection flood.
            for ip in addrs[:MAX_RESOLVED_ADDRESSES]:
                canonical = self.policy.check(ip).address or ip
                if (canonical, req.port) not in seen:
                    seen.add((canonical, req.port))
                    start_endpoint(_format_endpoint(ip, req.port), ip, req.port)
            if req.throughput is not None:
                # Concurrently with the page fetch, not after it.
                async def throughput() -> None:
                    state["throughput"] = [await self._throughput(
                        req, addrs, failure, clock, txids,
                        setup_deadline=started + _THROUGHPUT_SETUP_SECONDS - _THROUGHPUT_MARGIN)]

                tasks.append(asyncio.ensure_future(throughput()))
            await self._fetch_chain(req, addrs, failure, clock, txids, state, max_body=fetch_body)

        main = asyncio.ensure_future(dns_then_rest())
        doh = asyncio.ensure_future(self.doh(req.host, clock, txids)) if req.host_ip is None else None
        deadline = started + budget
        try:
            async with asyncio.timeout_at(deadline):
                await main
                if doh is not None:
                    state["doh"] = await doh
                # Endpoint tasks started by dns_then_rest are in ``tasks`` by now.
                await asyncio.gather(*tasks)
        except TimeoutError:
            pass
        finally:
            for task in [main, doh, *tasks]:
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in [main, doh, *tasks] if t is not None), return_exceptions=True)

        # Whatever did not finish within the request's time budget timed out.
        for task, (key, wants_tls) in pending_keys.items():
            tcp_out.setdefault(key, {"status": False, "failure": failures.GENERIC_TIMEOUT})
            if wants_tls:
                tls_out.setdefault(key, _tls_entry({"server_name": server_name, "failure": failures.GENERIC_TIMEOUT}))
        dns_section = state.get("dns") or {"failure": failures.GENERIC_TIMEOUT, "addrs": []}
        http_section = state.get("http") or _failed_http(state.get("final_url", req.url), failures.GENERIC_TIMEOUT)

        th_ips = {self.policy.check(a).address or a for a in dns_section["addrs"]}
        valid = {split_endpoint(k)[0] for k, v in tls_out.items() if v["status"]}
        valid = {self.policy.check(ip).address or ip for ip in valid}
        ip_info = {}
        for ip in sorted(probe_ips | th_ips):
            flags = (FLAG_RESOLVED_BY_PROBE if ip in probe_ips else 0) | (FLAG_RESOLVED_BY_TH if ip in th_ips else 0)
            flags |= FLAG_BOGON if self.policy.is_bogon(ip) else 0
            flags |= FLAG_VALID_FOR_DOMAIN if ip in valid else 0
            ip_info[ip] = {"asn": self.asn(ip), "flags": flags}

        response: dict[str, Any] = {
            "tcp_connect": tcp_out,
            "tls_handshake": tls_out,
            "quic_handshake": {},
            "http_request": http_section,
            "http3_request": None,
            "dns": dns_section,
            "ip_info": ip_info,
            "x_doh": state.get("doh") or [],
        }
        if req.throughput is not None:
            response["x_throughput"] = state.get("throughput") or [{
                "variant": "helper", "attempt": 1, "ip": None, "server_name": server_name,
                "bytes": 0, "seconds": None, "kbit_per_s": None,
                "failure": dns_section["failure"] or failures.GENERIC_TIMEOUT,
            }]
        return response

    async def _throughput(self, req: ControlRequest, addrs: list[str], dns_failure: str | None, clock: Clock,
                          txids: Transactions, *, setup_deadline: float) -> dict[str, Any]:
        """The timed download of ``x_throughput``: the request's URL (no
        redirects, as the probe's own downloads) from the first allowed
        address of the helper's lookup (IPv4 first, as the probe), measured by
        the probe's code (probes.throttling.timed_download: wire bytes from
        the request, 200 ms samples). Connect and TLS must finish by
        ``setup_deadline``; reading stops ``seconds`` after the request or at
        ``max_bytes``. The probe compares its rate with this one to tell
        address-based throttling from a slow site."""
        from probes import throttling

        seconds, max_bytes = req.throughput["seconds"], req.throughput["max_bytes"]
        https = req.scheme == "https"
        result: dict[str, Any] = {"variant": "helper", "attempt": 1, "ip": None, "server_name": req.host,
                                  "bytes": 0, "seconds": None, "kbit_per_s": None, "failure": None}
        allowed = [d.address for d in map(self.policy.check, addrs) if d.allowed]
        ipv4 = [a for a in allowed if ":" not in a]
        if dns_failure or not addrs:
            result["failure"] = dns_failure or failures.DNS_NO_ANSWER
            return result
        if not allowed:
            result.update(ip=addrs[0], failure=failures.ADDRESS_REFUSED)
            return result
        ip = (ipv4 or allowed)[0]
        result["ip"] = ip
        remaining = setup_deadline - asyncio.get_running_loop().time()
        if remaining < 0.1:
            result["failure"] = failures.GENERIC_TIMEOUT
            return result
        t = self.config.timeouts
        settings = throttling.Settings(
            download_seconds=seconds, max_bytes=max_bytes,
            connect_timeout=min(t.connect, remaining / 2 if https else remaining),
            handshake_timeout=min(t.tls, remaining / 2),
        )
        parts = urlsplit(req.url)
        default_port = req.port == (443 if https else 80)
        host_header = (f"[{req.host}]" if ":" in req.host else req.host) + ("" if default_port else f":{req.port}")
        entry = await throttling.timed_download(
            ip, req.port, tls_context=self.context if https else None, server_name=req.host if https else None,
            host_header=host_header, path=urlunsplit(("", "", parts.path or "/", parts.query, "")), clock=clock,
            txid=txids.next(), settings=settings,
        )
        result.update({k: entry[k] for k in ("bytes", "seconds", "kbit_per_s", "failure")})
        for key in ("x_status_code", "x_content_length", "x_body_bytes", "x_stopped", "x_ttfb", "x_bin_seconds",
                    "x_samples_kbit"):
            result[key] = entry.get(key)
        return result


def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if str(key).lower() == name.lower():
            return value[0] if isinstance(value, list) and value else (value if isinstance(value, str) else None)
    return None


def _remember_cookies(jar: dict[str, dict[str, str]], host: str, response: dict[str, Any]) -> None:
    """Keep cookies set by a redirect for later hops to the same host: sites
    that bounce through a cookie check otherwise loop until the redirect cap."""
    # headers_list keeps every Set-Cookie; the headers dict keeps only one.
    pairs = response.get("headers_list") or list((response.get("headers") or {}).items())
    values = [str(v) for k, v in pairs if str(k).lower() == "set-cookie"]
    for value in values:
        try:
            parsed = SimpleCookie(str(value))
        except CookieError:
            continue
        for name, morsel in parsed.items():
            jar.setdefault(host, {})[name] = morsel.value


# --- HTTP service ------------------------------------------------------------------


class Helper:
    """The aiohttp application around a Measurer: admission control, parsing,
    errors, health."""

    def __init__(self, config: HelperConfig):
        self.config = config
        self.measurer = Measurer(config)
        self.limiter = RateLimiter(config.rate_per_minute)
        self.in_flight = 0
        self.served = 0
        self.shed = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_request_body)
        app.router.add_post("/", self.handle_control)
        app.router.add_post("/api/v1/websites", self.handle_control)
        app.router.add_get("/health", self.handle_health)
        return app

    def _client(self, request: web.Request) -> str:
        if self.config.trust_forwarded_for:
            # The proxy appends its own line (HAProxy) or entry: the last one
            # is the one the client cannot forge.
            lines = request.headers.getall("X-Forwarded-For", [])
            forwarded = lines[-1] if lines else None
            if forwarded:
                # The last entry is the one our own proxy appended; earlier ones
                # are whatever the client chose to send.
                return forwarded.split(",")[-1].strip()
        return request.remote or "unknown"

    @staticmethod
    def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": reason}, status=status, headers=headers)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_request_body
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(f"request body larger than {limit} bytes")
        body = bytearray()
        # A client that dribbles its body would otherwise hold an in-flight
        # slot for as long as it likes.
        deadline = asyncio.get_running_loop().time() + _BODY_READ_SECONDS
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await request.content.read(16 * 1024)
            except TimeoutError:
                raise BadRequest("request body not received in time") from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise BadRequest(f"request body larger than {limit} bytes")

    async def handle_control(self, request: web.Request) -> web.Response:
        allowed, wait = self.limiter.allow(self._client(request))
        if not allowed:
            return self._error(429, "rate limit exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        if self.in_flight >= self.config.max_inflight:
            # Shedding immediately keeps latency bounded for the requests we
            # do accept; a probe retries later or asks its next helper.
            self.shed += 1
            return self._error(503, "overloaded", {"Retry-After": "5"})
        self.in_flight += 1
        started = time.monotonic()
        status = 200
        try:
            try:
                raw = await self._read_body(request)
                try:
                    data = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise BadRequest("malformed JSON") from None
                except RecursionError:  # hostile nesting, within the size cap
                    raise BadRequest("JSON nested too deeply") from None
                req = parse_request(data, self.config)
            except BadRequest as exc:
                status = 400
                return self._error(400, str(exc))
            result = await self.measurer.measure(req)
            self.served += 1
            return web.json_response(result)
        finally:
            self.in_flight -= 1
            # No client address, no URL: the log says how the service is doing,
            # not who measured what.
            log.info("control request status=%d duration=%.3fs in_flight=%d", status, time.monotonic() - started, self.in_flight)

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": SOFTWARE_VERSION, "in_flight": self.in_flight})


async def start(helper: Helper, listen: str) -> tuple[web.AppRunner, list[str]]:
    """Serve ``helper`` on ``listen`` ("HOST:PORT"; port 0 picks one). Returns
    the runner (for cleanup) and the bound "host:port" addresses."""
    host, port = split_endpoint(listen)
    if port is None:
        raise ValueError(f"--listen needs HOST:PORT, got {listen!r}")
    runner = web.AppRunner(helper.app(), access_log=None)  # aiohttp's access log records client addresses
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner, [_format_endpoint(str(a[0]), a[1]) for a in runner.addresses]


async def serve_forever(config: HelperConfig) -> None:
    runner, bound = await start(Helper(config), config.listen)
    log.info("vantage helper %s listening on %s (max_inflight=%d, rate_per_minute=%d, allow=%s)",
             SOFTWARE_VERSION, ", ".join(bound), config.max_inflight, config.rate_per_minute, config.allow or "none")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
