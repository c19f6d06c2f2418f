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
