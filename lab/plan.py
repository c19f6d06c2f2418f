"""Fixed addressing plan of the lab (LAB.md topology). Everything is in
198.18.0.0/15 (RFC 2544, reserved for benchmarking): no packet can be mistaken
for real traffic, and the namespaces have no link to the host's network.

    probe ── isp (ISP resolver) ── censor ── internet (sites, authoritative DNS, public resolver)
                                                 │
                                              control (helper, its own resolver)

Namespace names are ``f"{prefix}-{role}"`` where prefix is ``vl`` + a short
unique id, so a stale lab never collides with a new one. Interface names are
``iface(role, peer)`` inside each namespace, e.g. ``ce-is`` is the censor's
interface towards the isp (Linux allows 15 characters).
"""

from __future__ import annotations

ROLES = ("probe", "isp", "censor", "internet", "control")
ABBREVIATION = {"probe": "pr", "isp": "is", "censor": "ce", "internet": "in", "control": "co"}


def iface(role: str, peer: str) -> str:
    """Name of ``role``'s interface towards ``peer``."""
    return f"{ABBREVIATION[role]}-{ABBREVIATION[peer]}"

# (left role, right role, left address, right address), all /24 links.
LINKS = (
    ("probe", "isp", "198.18.1.2", "198.18.1.1"),
    ("isp", "censor", "198.18.2.1", "198.18.2.2"),
    ("censor", "internet", "198.18.3.1", "198.18.3.2"),
    ("internet", "control", "198.18.4.1", "198.18.4.2"),
)

PROBE_ADDRESS = "198.18.1.2"
ISP_RESOLVER = "198.18.1.1"          # in the isp namespace, the probe's system resolver
CENSOR_PROBE_SIDE = "198.18.2.2"     # censor's interface towards isp/probe
CENSOR_INTERNET_SIDE = "198.18.3.1"  # censor's interface towards the internet
CONTROL_ADDRESS = "198.18.4.2"       # the helper listens here (port 8080)
CONTROL_RESOLVER = "198.18.4.2"      # the control's own resolver (port 53)
HELPER_PORT = 8080
HELPER_URL = f"http://{CONTROL_ADDRESS}:{HELPER_PORT}/"

# In the internet namespace, on its loopback-like dummy interface:
AUTHORITATIVE_DNS = "198.18.53.1"
PUBLIC_RESOLVER = "198.18.53.8"      # reachable from the probe across the censor
SITE_NETWORK = "198.18.100.0/22"     # site addresses are handed out from here
GEO_CONTROL_NETWORK = "198.18.110.0/24"  # geo_dns: addresses given to the control side
BLOCKPAGE_SERVER = "198.18.250.10"   # where a dns-redirect may point to a censor blockpage

LAB_NETWORK = "198.18.0.0/15"        # the probe and analysis treat it as public

# --- IPv6 (2001:2::/48, RFC 5180, the IPv6 benchmarking range) ------------------
# One /64 per link, the same numbering as IPv4: 198.18.N.x is 2001:2:0:N::x.
# Namespaces get IPv6 only when a scenario needs it (a site with ipv6 = true or
# probe_ipv6 other than "none"); the probe's network gets it per probe_ipv6.
LINKS6 = (
    ("probe", "isp", "2001:2:0:1::2", "2001:2:0:1::1"),
    ("isp", "censor", "2001:2:0:2::1", "2001:2:0:2::2"),
    ("censor", "internet", "2001:2:0:3::1", "2001:2:0:3::2"),
    ("internet", "control", "2001:2:0:4::1", "2001:2:0:4::2"),
)
PROBE_ADDRESS6 = "2001:2:0:1::2"
CONTROL_ADDRESS6 = "2001:2:0:4::2"
PROBE_NETWORKS = ("198.18.1.0/24", "198.18.2.0/24", "2001:2:0:1::/64", "2001:2:0:2::/64")  # the probe's and its ISP's
CONTROL_NETWORKS = ("198.18.4.0/24", "2001:2:0:4::/64")
SITE_NETWORK6 = "2001:2:0:100::/64"
GEO_CONTROL_NETWORK6 = "2001:2:0:110::/64"
LAB_NETWORK6 = "2001:2::/48"
PUBLIC_NETWORKS = (LAB_NETWORK, LAB_NETWORK6)  # what --public-network / --allow get

# --- CDN sites and the lab's IP-to-ASN database -----------------------------------
# cdn = true: the probe's side gets addresses from one prefix, the control's
# from another, both announced by one autonomous system (the lab's CDN).
CDN_PROBE_NETWORK = "198.18.120.0/24"
CDN_CONTROL_NETWORK = "198.18.121.0/24"
CDN_PROBE_NETWORK6 = "2001:2:0:120::/64"
CDN_CONTROL_NETWORK6 = "2001:2:0:121::/64"
CDN_ASN, CDN_ORG = 64600, "Vantage Lab CDN"
PROBE_ASN, PROBE_ORG = 64500, "Vantage Lab ISP"
CONTROL_ASN, CONTROL_ORG = 64501, "Vantage Lab Data Centre"
SITE_ASN_BASE = 64512  # + site index: every other site is hosted by a network of its own
GEO_CC = "ZZ"          # country of every lab address (the probe runs with --probe-cc ZZ)

# --- routers between the isp and the censor (a scenario's ``hops = N``) -----------
# With hops = N the chain isp ── r1 ── ... ── rN ── censor replaces the isp ──
# censor link: the isp keeps 198.18.2.1 (its uplink is still ``is-ce``), r1
# gets 198.18.2.2, link k (r_k ── next) is 198.18.(60+k).0/24 (.1 left, .2
# right), and the censor's probe-side interface (still ``ce-is``) gets .2 of
# the last one. Each router forwards and answers ICMP time-exceeded (IPv4).
# Seen from the probe: hop 1 is the isp, hops 2..N+1 the routers, hop N+2 the
# censor, hop N+3 the internet (sites, DNS servers).
MAX_HOPS = 8
ROUTER_ROLES = tuple(f"r{i}" for i in range(1, MAX_HOPS + 1))
ROUTER_LINK_BASE = 60
# The links beyond the first router belong to a transit network of their own
# (the lab's IP-to-ASN database says so): the censor's probe-side address
# with hops > 0 is in it, so a traceroute can name the censor hop's ASN.
TRANSIT_NETWORKS = tuple(f"198.18.{ROUTER_LINK_BASE + k}.0/24" for k in range(1, MAX_HOPS + 1))
TRANSIT_ASN, TRANSIT_ORG = 64503, "Vantage Lab Transit"


def router_chain(hops: int) -> list[tuple[str, str, str, str, str, str]]:
    """(left role, right role, left address, right address, left iface, right
    iface) of each link from the isp to the censor, ``hops`` routers between."""
    nodes = ["isp", *ROUTER_ROLES[:hops], "censor"]
    out = []
    for k in range(len(nodes) - 1):
        net = "198.18.2" if k == 0 else f"198.18.{ROUTER_LINK_BASE + k}"
        left_if = "is-ce" if k == 0 else f"{nodes[k]}-up"
        right_if = "ce-is" if k == len(nodes) - 2 else f"{nodes[k + 1]}-dn"
        out.append((nodes[k], nodes[k + 1], f"{net}.1", f"{net}.2", left_if, right_if))
    return out


def censor_probe_side(hops: int = 0) -> str:
    """The censor's address towards the probe (CENSOR_PROBE_SIDE when hops = 0)."""
    return router_chain(hops)[-1][3]


def hop_addresses(hops: int = 0) -> list[str]:
    """The address each hop answers time-exceeded from, hop 1 (the isp) first,
    up to the censor (hop hops + 2)."""
    return [plan_link[3] if i else "198.18.1.1" for i, plan_link in enumerate([None, *router_chain(hops)])]
