"""Address helpers shared by the tests: literal checks and ``ip:port`` text
(``[v6]:port`` for IPv6, as OONI writes endpoints)."""

from __future__ import annotations

import ipaddress


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
