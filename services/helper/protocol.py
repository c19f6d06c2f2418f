"""The ts-017 control protocol as the helper speaks it: what a request may
hold (parsed and validated into a ``ControlRequest``) and the shapes of the
answer's sections (docs/helper.md documents every field)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from core.net import USER_AGENT, host_for_url, parse_ip, split_endpoint, url_host

from .config import HelperConfig

# ip_info flags (a bitmask, same meaning as OONI's TH).
FLAG_RESOLVED_BY_PROBE = 1  # the address is in the probe's tcp_connect list
FLAG_RESOLVED_BY_TH = 2  # the helper's own lookup returned it
FLAG_BOGON = 4  # not a public address (and not allow-listed by the operator)
FLAG_VALID_FOR_DOMAIN = 8  # the helper completed a verified TLS handshake for the domain with it

# Request headers a probe may pass on to the fetch. Anything else (Host,
# Cookie, Authorization, hop-by-hop headers) would let a client steer the
# helper's request beyond "fetch this URL like a browser".
FORWARDED_HEADERS = ("User-Agent", "Accept", "Accept-Language")
MAX_URL = 4096
MAX_THROUGHPUT_SECONDS = 10.0
MAX_THROUGHPUT_BYTES = 64 * 1024 * 1024


class BadRequest(Exception):
    """A request the helper refuses to measure; answered 400 with the reason."""


# --- the request -------------------------------------------------------------------


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


def normalize_url(url: str) -> tuple[str, str, str, str | None, int]:
    """(url, scheme, host, host_ip, port) with odd IPv4 hosts rewritten to the
    dotted quad they stand for (as browsers do), so what is checked is what is
    fetched."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise BadRequest("http_request must be a URL string")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("http_request must be an http:// or https:// URL with a host")
    # Classify the host as the HTTP client will read it (IDNA/NFKC: full-width
    # digits are an IP literal to it), and fetch the normalised URL, so what is
    # checked is what is fetched (issue 10: http://１２７.０.０.１/ reached loopback).
    try:
        hostname, ip = url_host(url)
    except ValueError:
        raise BadRequest("invalid hostname") from None
    port = port or (443 if scheme == "https" else 80)
    if ip is not None:
        host = str(ip)
        host_ip: str | None = host
    else:
        host = hostname
        host_ip = None
    netloc = host_for_url(host) if parts.port is None else f"{host_for_url(host)}:{parts.port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), scheme, host, host_ip, port


def _forwarded_headers(raw_headers: Any) -> dict[str, str]:
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
    headers.setdefault("User-Agent", USER_AGENT)
    return headers


def _endpoints(endpoints: Any, config: HelperConfig) -> list[str]:
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise BadRequest("tcp_connect must be a list of \"ip:port\" strings")
    if len(endpoints) > config.max_endpoints:
        raise BadRequest(f"too many tcp_connect endpoints (max {config.max_endpoints})")
    for endpoint in endpoints:
        ip_text, port = split_endpoint(endpoint)
        if not port or parse_ip(ip_text) is None:
            raise BadRequest(f"invalid tcp_connect endpoint: {endpoint[:64]!r}")
    return list(dict.fromkeys(endpoints))


def _throughput(throughput: Any) -> dict[str, float] | None:
    if throughput is None:
        return None
    if not isinstance(throughput, dict):
        raise BadRequest("x_throughput must be an object")
    seconds, max_bytes = throughput.get("seconds", 3), throughput.get("max_bytes", 16 * 1024 * 1024)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_THROUGHPUT_SECONDS:
        raise BadRequest(f"x_throughput.seconds must be a number in (0, {MAX_THROUGHPUT_SECONDS:g}]")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise BadRequest("x_throughput.max_bytes must be a positive integer")
    return {"seconds": float(seconds), "max_bytes": min(max_bytes, MAX_THROUGHPUT_BYTES)}


def parse_request(data: Any, config: HelperConfig) -> ControlRequest:
    if not isinstance(data, dict):
        raise BadRequest("request must be a JSON object")
    if "http_request" not in data:
        raise BadRequest("missing field: http_request")
    if "tcp_connect" not in data:
        raise BadRequest("missing field: tcp_connect")
    url, scheme, host, host_ip, port = normalize_url(data["http_request"])
    headers = _forwarded_headers(data.get("http_request_headers"))
    endpoints = _endpoints(data["tcp_connect"], config)
    throughput = _throughput(data.get("x_throughput"))
    return ControlRequest(url, scheme, host, host_ip, port, headers, endpoints, throughput)


# --- the answer's sections ---------------------------------------------------------


def failed_http(url: str, failure: str) -> dict[str, Any]:
    return {
        "body_length": -1, "discovered_h3_endpoint": "", "failure": failure, "title": "", "headers": {},
        "status_code": -1, "x_final_url": url, "x_body_sha256": None, "x_body_truncated": False,
        "x_body_simhash": None,
    }


def http_section(url: str, entry: dict[str, Any], page: dict[str, Any]) -> dict[str, Any]:
    """``http_request`` for a fetch that got a response (``entry``: the
    probes.http record of the last hop; ``page``: services.helper.page facts)."""
    response = entry.get("response") or {}
    code = response.get("code")
    headers = response.get("headers") or {}
    return {
        "body_length": page["body_length"],
        "discovered_h3_endpoint": "",
        # A failure after the headers (reset mid-body, deadline) still
        # matters to the comparison; a truncated body is not a failure.
        "failure": entry.get("failure"),
        "title": page["title"],
        "headers": {str(k): (", ".join(v) if isinstance(v, list) else str(v)) for k, v in headers.items()},
        "status_code": code if code is not None else -1,
        "x_final_url": url,
        "x_body_sha256": page["sha256"],
        "x_body_truncated": bool(response.get("body_is_truncated")),
        "x_body_simhash": page["simhash"],
    }


def tls_entry(entry: dict[str, Any]) -> dict[str, Any]:
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


def failed_tls(server_name: str, failure: str) -> dict[str, Any]:
    return tls_entry({"server_name": server_name, "failure": failure})


def tcp_entry(success: bool, failure: str | None) -> dict[str, Any]:
    return {"status": success, "failure": failure}


def ip_flags(ip: str, *, probe_ips: set[str], th_ips: set[str], valid: set[str], bogon: bool) -> int:
    return ((FLAG_RESOLVED_BY_PROBE if ip in probe_ips else 0) | (FLAG_RESOLVED_BY_TH if ip in th_ips else 0)
            | (FLAG_BOGON if bogon else 0) | (FLAG_VALID_FOR_DOMAIN if ip in valid else 0))


def throughput_sample(server_name: str, failure: str | None = None, ip: str | None = None) -> dict[str, Any]:
    """An ``x_throughput`` entry before (or instead of) its timed download."""
    return {"variant": "helper", "attempt": 1, "ip": ip, "server_name": server_name,
            "bytes": 0, "seconds": None, "kbit_per_s": None, "failure": failure}


def dns_section(failure: str | None, addrs: list[str]) -> dict[str, Any]:
    return {"failure": failure, "addrs": addrs}

