"""The helper's settings (`vantage helper serve` options and config file keys).

``HelperConfig.from_mapping`` checks every value when the helper starts (type,
range, that files exist): a wrong value is one line naming the key
(``HelperConfigError``), never a helper that starts and then answers 500.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from core.errors import VantageError
from core.net import is_ip, parse_host_port
from probes.timeouts import Timeouts


class HelperConfigError(VantageError, ValueError):
    """A helper setting the operator can fix; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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
    access_log: bool = False  # one log line per control request (else a summary a minute)
    max_request_body: int = 64 * 1024
    max_response_body: int = 512 * 1024
    max_redirects: int = 10
    max_endpoints: int = 32
    request_timeout: float = 30.0  # total time for one control request
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(dns=5.0, connect=8.0, tls=8.0, http=15.0))

    KEYS = ("listen", "allow", "max_inflight", "rate_per_minute", "resolver", "doh_url", "ca_file", "asn_db",
            "trust_forwarded_for", "access_log", "max_request_body", "max_response_body", "max_redirects",
            "max_endpoints", "request_timeout")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> "HelperConfig":
        """Build from a config file's table (keys as in KEYS, dashes allowed),
        every value checked; raises HelperConfigError (a ValueError) naming
        the first wrong key."""
        known = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(known) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown helper config keys: {', '.join(unknown)}")
        checked = {}
        for key, value in known.items():
            try:
                checked[key] = _CHECKS[key](value)
            except ValueError as exc:
                raise HelperConfigError(key, f"{key} = {value!r}: {exc}") from None
        return cls(**checked)


def _split_listen(value: str) -> tuple[str, int]:
    head, sep, port = value.rpartition(":")
    if sep and port == "0" and (value.startswith("[") or value.count(":") == 1):
        return parse_host_port(head + ":1")[0], 0
    return parse_host_port(value)


def parse_listen(text: str) -> tuple[str, int]:
    """``listen``'s "HOST:PORT" ("[v6]:PORT" for IPv6) with core.net's rules;
    port 0 asks the system for a free port. Raises ValueError with the reason."""
    try:
        return _split_listen(str(text).strip())
    except ValueError as exc:
        raise ValueError(f"--listen needs HOST:PORT: {exc}") from None


# --------------------------------------------------------------------------
# One check per key: the value as given (TOML types, or click's) -> the value
# kept, or ValueError with the reason.


def _whole(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number (at least {minimum})")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number of seconds above 0")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value.strip()


def _listen(value: Any) -> str:
    try:
        _split_listen(_text(value))
    except ValueError as exc:
        raise ValueError(f"needs HOST:PORT ({exc})") from None
    return _text(value)


def _allow(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ValueError("must be a list of CIDRs")
    for cidr in items:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not a CIDR (e.g. 198.18.0.0/15)") from None
    return [c.strip() for c in items]


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(value: Any) -> Any:
        return None if value is None or value == "" else check(value)
    return optional


def _resolver(value: Any) -> str:
    host, _ = parse_host_port(_text(value), 53)
    if not is_ip(host):
        raise ValueError("must be an IP address, ip[:port]")
    return _text(value)


def _https_url(value: Any) -> str:
    parts = urlsplit(_text(value))
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("must be an https URL")
    return _text(value)


def _ca_file(value: Any) -> str:
    import ssl

    from probes.tls import make_context

    path = os.path.expanduser(_text(value))
    if not os.path.isfile(path):
        raise ValueError("no such file")
    try:
        make_context(path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"not a usable PEM CA certificate ({exc})") from None
    return path


def _directory(value: Any) -> str:
    path = os.path.expanduser(_text(value))
    if not os.path.isdir(path):
        raise ValueError("no such directory")
    return path


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "listen": _listen,
    "allow": _allow,
    "max_inflight": _whole(1),
    "rate_per_minute": _whole(0),
    "resolver": _optional(_resolver),
    "doh_url": _optional(_https_url),
    "ca_file": _optional(_ca_file),
    "asn_db": _optional(_directory),
    "trust_forwarded_for": _flag,
    "access_log": _flag,
    "max_request_body": _whole(1),
    "max_response_body": _whole(1),
    "max_redirects": _whole(0),
    "max_endpoints": _whole(1),
    "request_timeout": _seconds,
}
