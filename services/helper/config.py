"""The helper's settings (`vantage helper serve` options and config file keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.net import parse_host_port
from probes.timeouts import Timeouts


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


def parse_listen(text: str) -> tuple[str, int]:
    """``listen``'s "HOST:PORT" ("[v6]:PORT" for IPv6) with core.net's rules;
    port 0 asks the system for a free port. Raises ValueError with the reason."""
    value = str(text).strip()
    head, sep, port = value.rpartition(":")
    if sep and port == "0" and (value.startswith("[") or value.count(":") == 1):
        return parse_host_port(head + ":1")[0], 0
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ValueError(f"--listen needs HOST:PORT: {exc}") from None
