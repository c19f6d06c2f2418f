"""``ip_info.asn``: the network an address belongs to, from a MaxMind-format
ASN database (GeoLite2-ASN or compatible).

Not probes.geo.GeoDB: that one needs both ``asn.mmdb`` and ``country.mmdb`` by
those names, while the helper takes a directory with any ``*asn*.mmdb`` (what
`vantage geo update` downloads included) and needs no country database."""

from __future__ import annotations

from pathlib import Path


class AsnLookup:
    """ASN of an address from the ASN database found in a directory; 0 when
    not configured or not found."""

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
