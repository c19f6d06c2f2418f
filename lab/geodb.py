"""The lab's IP-to-ASN and country databases, in MaxMind DB format.

The probe (``geo_db`` setting, ``VANTAGE_GEO_DB``), the helper (``--asn-db``)
and the analysis read the same files a real run gets from `vantage geo update`:
``asn.mmdb`` (GeoLite2-ASN keys ``autonomous_system_number`` /
``autonomous_system_organization``) and ``country.mmdb`` (``country.iso_code``).
Written with mmdb-writer (netaddr), as one IPv6 database that holds the IPv4
addresses too (``::a.b.c.d/96``), which is how MaxMind's own files are built.

What the lab's database says (lab/plan.py):

- the probe's network and its ISP's: AS64500 "Vantage Lab ISP";
- the control network: AS64501 "Vantage Lab Data Centre";
- the CDN's two prefixes (probe side and control side, IPv4 and IPv6): one AS,
  AS64600 "Vantage Lab CDN" — what makes a CDN site's differing answers
  consistent for a peer that compares ASNs;
- every other site: an AS of its own (64512 + its index in the scenario), for
  all its addresses (a geo_dns site's two sets included: one operator);
- the DNS servers: AS64502 "Vantage Lab Resolvers";
- the links between the routers of ``hops = N`` (and the censor's probe-side
  address when N > 0): AS64503 "Vantage Lab Transit" (with N = 0 the censor's
  probe side is in the ISP's network).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from . import plan

RESOLVER_ASN, RESOLVER_ORG = 64502, "Vantage Lab Resolvers"


def asn_records(addresses: dict[str, list[str]], control: dict[str, list[str]], cdn: set[str]) -> list[tuple[str, int, str]]:
    """(network, ASN, organisation) for every lab address the database knows."""
    records = [(n, plan.PROBE_ASN, plan.PROBE_ORG) for n in plan.PROBE_NETWORKS]
    records += [(n, plan.CONTROL_ASN, plan.CONTROL_ORG) for n in plan.CONTROL_NETWORKS]
    records += [(n, plan.CDN_ASN, plan.CDN_ORG) for n in (plan.CDN_PROBE_NETWORK, plan.CDN_CONTROL_NETWORK,
                                                          plan.CDN_PROBE_NETWORK6, plan.CDN_CONTROL_NETWORK6)]
    records += [(f"{a}/32", RESOLVER_ASN, RESOLVER_ORG) for a in (plan.AUTHORITATIVE_DNS, plan.PUBLIC_RESOLVER)]
    records += [(n, plan.TRANSIT_ASN, plan.TRANSIT_ORG) for n in plan.TRANSIT_NETWORKS]
    for index, domain in enumerate(addresses):
        if domain in cdn:
            continue  # inside the CDN's prefixes already
        for a in addresses[domain] + control.get(domain, []):
            bits = 32 if ipaddress.ip_address(a).version == 4 else 128
            records.append((f"{a}/{bits}", plan.SITE_ASN_BASE + index, f"{domain} hosting"))
    return records


def write(directory: Path, addresses: dict[str, list[str]], control: dict[str, list[str]], cdn: set[str]) -> Path:
    """Write ``asn.mmdb`` and ``country.mmdb`` into ``directory``; returns it."""
    from mmdb_writer import MMDBWriter, MmdbU32
    from netaddr import IPSet

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    asn = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
                     languages=["en"], description="Vantage lab IP-to-ASN database")
    for network, number, org in asn_records(addresses, control, cdn):
        asn.insert_network(IPSet([network]), {"autonomous_system_number": MmdbU32(number),
                                              "autonomous_system_organization": org})
    asn.to_db_file(str(directory / "asn.mmdb"))
    country = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="DBIP-Country-Lite",
                         languages=["en"], description="Vantage lab country database")
    country.insert_network(IPSet([plan.LAB_NETWORK, plan.LAB_NETWORK6]), {"country": {"iso_code": plan.GEO_CC}})
    country.to_db_file(str(directory / "country.mmdb"))
    return directory
