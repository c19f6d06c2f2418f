"""Network facts shared by the probe, the helper and the analysis, each written once.

- Endpoints: ``ip:port`` text, ``[v6]:port`` for IPv6 (as OONI writes them).
- The request a probe and a helper send: one User-Agent and header set, so the
  probe's fetch and the control's are the same request.
- Redirect status codes.
- Special-purpose address ranges (RFC 6890 and successors), with why each is
  not public: the helper refuses them as targets (SSRF), the probe does not
  follow redirects into them, the analysis calls DNS answers in them bogons.

Addresses are classified from our own table rather than ``ipaddress``'s
is_global/is_private, whose answers changed between Python versions. Odd IPv4
spellings are parsed the way ``inet_aton`` (and so glibc's resolver and most
URL parsers) would read them — ``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
``127.1`` all mean 127.0.0.1 — because a policy that does not read them that
way is bypassed by them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# --------------------------------------------------------------------------
# Endpoints


def is_ip(host: str) -> bool:
    """A plain IP literal (no brackets, no odd IPv4 spellings)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def host_for_url(host: str) -> str:
    """The host as a URL or Host header writes it (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def split_endpoint(text: str) -> tuple[str, int | None]:
    """'1.2.3.4:443' or '[::1]:443' -> (ip, port); port None when absent or invalid."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        if host.endswith("]"):
            host = host[:-1]
        return host, int(port) if port.isdigit() and int(port) < 65536 else None
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, None
    return host, int(port) if port.isdigit() and int(port) < 65536 else None


def url_host(url: str) -> tuple[str, IPAddress | None]:
    """The host of ``url`` exactly as the HTTP client (aiohttp, through yarl)
    will connect to it, and the address it denotes when it is an IP literal in
    any spelling. Checks must run on this, never on the text as written: yarl
    applies IDNA/NFKC, so ``http://１２７.０.０.１/`` (full-width digits) is
    127.0.0.1 to the client although it parses as a name. Raises ValueError for
    a URL without a usable host."""
    from yarl import URL  # aiohttp's URL type: the normalisation the fetch will apply

    try:
        host = URL(url.strip()).raw_host
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"invalid URL host: {exc}") from None
    if not host:
        raise ValueError("the URL has no host")
    host = host.rstrip(".") or host
    return host, parse_ip(host)


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """User input: "host", "host:port", "v6" or "[v6]:port" -> (host, port).
    Raises ValueError with a short reason (bad brackets, a port outside 1-65535,
    no port and no default)."""
    value = text.strip()
    port_text = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"'{text}' is not host[:port]")
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host = value  # a name, IPv4, or a bare IPv6 literal
    if not host:
        raise ValueError(f"'{text}' has no host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"'{text}' has no port (host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"'{text}' has an invalid port (1-65535)")
    return host, int(port_text)


# --------------------------------------------------------------------------
# The request: what a current desktop browser sends (some censors and sites
# treat unusual clients differently). No "br": bodies are decoded by the
# probe and brotli is not a dependency.

USER_AGENT = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Safari/537.36")
REQUEST_HEADERS = {
    "User-Agent": USER_AGENT,
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Accept-Language": "en-US,en;q=0.9",
    "Accept-Encoding": "gzip, deflate",
}

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

# --------------------------------------------------------------------------
# Special-purpose ranges: (network, why it is not a public address).
SPECIAL_V4 = [
    ("0.0.0.0/8", "unspecified/this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-protocol-assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4-relay-anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255 broadcast
]
SPECIAL_V6 = [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "ipv4-compatible"),  # deprecated form; embedded IPv4 is checked too
    ("100::/64", "discard"),
    ("2001::/23", "ietf-protocol-assignments"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "srv6-sids"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "nat64-local-use"),
]
# IPv6 prefixes whose low bits carry an IPv4 address a packet may end up at.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")

_REFUSED: list[tuple[IPNetwork, str]] = [
    (ipaddress.ip_network(net), why) for net, why in SPECIAL_V4 + SPECIAL_V6
]

_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


def parse_ipv4_lenient(text: str) -> ipaddress.IPv4Address | None:
    """Read ``text`` as ``inet_aton`` does: 1 to 4 dot-separated parts, each
    decimal, octal (leading 0) or hex (0x); the last part fills the remaining
    bytes. Returns None when ``text`` is not such a number (i.e. a hostname)."""
    text = text.strip()
    if text.endswith("."):  # "127.0.0.1." is accepted by resolvers and URL parsers
        text = text[:-1]
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_PART.match(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2] in ("0x", "0X"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p[0] == "0":
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def parse_ip(text: str) -> IPAddress | None:
    """An IP literal in any spelling a URL or endpoint may use (brackets, IPv6
    zone ids, odd IPv4 notations), or None for a hostname."""
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:  # zone id: it selects an interface, the address is what matters
        host = host.split("%", 1)[0]
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return parse_ipv4_lenient(host)


def canonical(ip: IPAddress) -> IPAddress:
    """The address a connection really reaches: IPv4-mapped and IPv4-compatible
    IPv6 forms become the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        # IPv4-compatible ::a.b.c.d (deprecated, but some stacks still route it);
        # :: and ::1 are left alone, they are their own refused ranges.
        if int(ip) >> 32 == 0 and int(ip) > 0xFFFF:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address, or None if it is one.
    Ignores any allow-list (see ``Policy``)."""
    ip = canonical(ip)
    for net, why in _REFUSED:
        if ip.version == net.version and ip in net:
            return why
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = refusal_reason(inner)
        if why:
            return f"embedded-{why}"
    return None


@dataclass
class Decision:
    allowed: bool
    address: str | None  # canonical address to connect to (when parsed)
    reason: str | None  # why refused (None when allowed)


@dataclass
class Policy:
    """The helper's target policy. ``allow`` lists CIDRs that are accepted even
    though they are not public (the lab's 198.18.0.0/15, tests' loopback).
    The allow-list is matched against the canonical address, so
    ``::ffff:127.0.0.1`` is allowed exactly when 127.0.0.1 is."""

    allow: list[IPNetwork] = field(default_factory=list)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> "Policy":
        nets = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"invalid CIDR in allow-list: {cidr!r}") from exc
        return cls(allow=nets)

    def is_allowlisted(self, ip: IPAddress) -> bool:
        ip = canonical(ip)
        return any(ip.version == net.version and ip in net for net in self.allow)

    def check_ip(self, ip: IPAddress) -> Decision:
        ip = canonical(ip)
        if self.is_allowlisted(ip):
            return Decision(True, str(ip), None)
        why = refusal_reason(ip)
        return Decision(why is None, str(ip), why)

    def check(self, text: str) -> Decision:
        """Check an address given as text (any spelling). A hostname is refused:
        callers resolve first and check each resolved address."""
        ip = parse_ip(text)
        if ip is None:
            return Decision(False, None, "not-an-address")
        return self.check_ip(ip)

    def is_bogon(self, text: str) -> bool:
        """For ``ip_info`` flags: an address that is not public, unless the
        operator declared it routable by allow-listing it (the lab's addresses
        are the lab's public internet)."""
        ip = parse_ip(text)
        if ip is None:
            return False
        return not self.check_ip(ip).allowed
