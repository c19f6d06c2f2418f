"""Probe location: country and network (ASN) from MaxMind-format databases.

A measurement records where it was taken (country, ASN, network name) but
never the probe's IP address. The public IP is looked up once per run; it is
handed back separately (``ProbeLocation.ip_for_scrubbing``) only so that the
caller can erase it from stored response bodies, and it is kept out of repr()
and as_dict() so it cannot leak into a record or a log by accident.

The databases are the ones OONI Probe ships (``asn.mmdb``: GeoLite2-ASN keys
``autonomous_system_number`` / ``autonomous_system_organization``;
``country.mmdb``: DB-IP lite, ``country.iso_code``), downloaded gzipped by
`vantage geo update`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import maxminddb

from core.download import DownloadFailed, describe, fetch_capped, install_atomically
from core.errors import VantageError

DEFAULT_GEO_URL = "https://github.com/ooni/probe-assets/releases/latest/download/"
GEO_URL_ENV = "VANTAGE_GEO_URL"
GEO_FILES = {"asn": "asn.mmdb.gz", "country": "country.mmdb.gz"}
PUBLIC_IP_URL = "https://api.ipify.org"
MAX_COMPRESSED = 100 * 1024 * 1024  # today ~6 MB; a guard against a rogue mirror
MAX_DB_BYTES = 400 * 1024 * 1024  # guard against a gzip bomb
DEFAULT_TIMEOUT = 120.0

UNKNOWN_CC = "ZZ"
UNKNOWN_ASN = "AS0"


class GeoError(VantageError):
    """A geolocation problem the user can fix (missing or broken database, offline)."""


def geo_url() -> str:
    url = os.environ.get(GEO_URL_ENV) or DEFAULT_GEO_URL
    return url if url.endswith("/") else url + "/"


def default_geo_dir() -> Path:
    from .config import load_config

    return Path(load_config().geo_db)


# --------------------------------------------------------------------------
# Lookups


class GeoDB:
    """Both databases of a directory; ``lookup(ip) -> (cc, "AS<n>", name | None)``.

    Unknown, private or unparsable addresses give ("ZZ", "AS0", None), the
    values OONI uses for "unknown", so analysis can group them.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._readers: dict[str, Any] = {}
        try:
            for kind in GEO_FILES:
                path = self.directory / f"{kind}.mmdb"
                if not path.is_file():
                    raise GeoError(f"no geolocation database at {path}: run `vantage geo update` first")
                try:
                    self._readers[kind] = maxminddb.open_database(str(path))
                except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
                    raise GeoError(f"{path} is not a usable MaxMind database ({exc}): "
                                   "run `vantage geo update`") from None
        except GeoError:
            self.close()
            raise

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> "GeoDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, kind: str, ip: str) -> dict | None:
        try:
            record = self._readers[kind].get(ip)
        except ValueError:  # not an IP address
            return None
        return record if isinstance(record, dict) else None

    def lookup(self, ip: str) -> tuple[str, str, str | None]:
        country = self._get("country", ip) or {}
        asn = self._get("asn", ip) or {}
        cc = (country.get("country") or {}).get("iso_code") or UNKNOWN_CC
        number = asn.get("autonomous_system_number")
        name = asn.get("autonomous_system_organization") or None
        return cc, f"AS{number}" if number else UNKNOWN_ASN, name

    def metadata(self) -> dict[str, Any]:
        """Database type and build time of each file, for `vantage geo` output."""
        return {kind: {"type": r.metadata().database_type, "build_epoch": r.metadata().build_epoch}
                for kind, r in self._readers.items()}


# --------------------------------------------------------------------------
# Download


def _validate_mmdb(path: str, kind: str) -> None:
    try:
        reader = maxminddb.open_database(path, maxminddb.MODE_FILE)
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoError(f"the downloaded {kind} database is not a MaxMind database ({exc}); "
                       "nothing was changed") from None
    try:
        # Wrong-file guard: an ASN database must have ASN keys, etc.
        probe = reader.get("8.8.8.8") or reader.get("1.1.1.1") or {}
        expected = "autonomous_system_number" if kind == "asn" else "country"
        if probe and expected not in probe:
            raise GeoError(f"the downloaded {kind} database has no '{expected}' field "
                           f"({reader.metadata().database_type}); nothing was changed")
    finally:
        reader.close()


def _gunzip(body: bytes, kind: str) -> bytes:
    try:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        data = d.decompress(body, MAX_DB_BYTES + 1)
        if len(data) > MAX_DB_BYTES or d.unconsumed_tail:
            raise GeoError(f"the downloaded {kind} database expands beyond {MAX_DB_BYTES >> 20} MB; nothing was changed")
        if not d.eof:
            raise GeoError(f"the downloaded {kind} database is truncated; nothing was changed")
        return data
    except zlib.error as exc:
        raise GeoError(f"the downloaded {kind} database is not gzip data ({exc}); nothing was changed") from None


async def _fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    try:
        return await fetch_capped(session, url, MAX_COMPRESSED, chunk_size=256 * 1024)
    except DownloadFailed as exc:
        raise GeoError(f"cannot download the geolocation databases: {exc}") from None


async def download_geo(
    dest: str | os.PathLike | None = None, base: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Path]:
    """Fetch, gunzip, validate and atomically install asn.mmdb and country.mmdb.

    Both files are validated before either is renamed into place, so a failed
    update keeps the previous pair (a mixed old/new pair would be harmless,
    but a half-written file would not).
    """
    target = Path(dest) if dest else default_geo_dir()
    root = base or geo_url()
    root = root if root.endswith("/") else root + "/"
    urls = {kind: root + name for kind, name in GEO_FILES.items()}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True) as session:
            bodies = await asyncio.gather(*(_fetch(session, url) for url in urls.values()), return_exceptions=True)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise GeoError(f"cannot download the geolocation databases: {describe(exc)}") from None
    for (kind, url), body in zip(urls.items(), bodies):
        if isinstance(body, GeoError):
            raise body
        if isinstance(body, (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)):
            raise GeoError(f"cannot download the geolocation databases: {describe(body)} ({url})") from None
        if isinstance(body, BaseException):
            raise body

    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeoError(f"cannot create {target}: {exc.strerror}") from None
    files = {f"{kind}.mmdb": _gunzip(body, kind) for kind, body in zip(urls, bodies)}
    try:
        install_atomically(target, files, check=lambda name, tmp: _validate_mmdb(tmp, name.removesuffix(".mmdb")))
    except OSError as exc:
        raise GeoError(f"cannot write the geolocation databases in {target}: {exc.strerror or exc}") from None
    return {kind: target / f"{kind}.mmdb" for kind in GEO_FILES}


def update_geo(**kwargs) -> dict[str, Path]:
    """Synchronous wrapper for the CLI."""
    return asyncio.run(download_geo(**kwargs))


# --------------------------------------------------------------------------
# Probe location


@dataclass(frozen=True)
class ProbeLocation:
    cc: str
    asn: str
    network_name: str | None
    warning: str | None = None
    # Only for erasing the address from stored bodies; never stored itself.
    ip_for_scrubbing: str | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """Record-safe fields (no IP address)."""
        return {"probe_cc": self.cc, "probe_asn": self.asn, "probe_network_name": self.network_name}


PublicIPFetcher = Callable[[], Awaitable[str]]


async def fetch_public_ip(timeout: float = 5.0, url: str = PUBLIC_IP_URL) -> str:
    """Ask a plain HTTPS echo service for our address (short timeout; no STUN)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True) as session:
        async with session.get(url) as resp:
            resp.raise_for_status()
            return (await resp.content.read(100)).decode("ascii", "replace").strip()


def _short(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return (str(exc).split("\n")[0] or type(exc).__name__)[:200]


async def discover_probe_location(
    config: Any,
    public_ip_fetcher: PublicIPFetcher | None = None,
    geo_dir: str | os.PathLike | None = None,
) -> ProbeLocation:
    """Country, ASN and network name of this probe; never raises.

    ``config.probe_cc`` / ``config.probe_asn`` win over geolocation (for a
    volunteer whose network is mis-geolocated, or who does not want a lookup
    to decide). When something is missing the unknown values ZZ / AS0 are used
    and ``warning`` says why in one line, so the run can go on and the caller
    can show it.
    """
    cc_override = (getattr(config, "probe_cc", "") or "").upper()
    asn_override = getattr(config, "probe_asn", "") or ""
    fetcher = public_ip_fetcher or fetch_public_ip
    directory = geo_dir or getattr(config, "geo_db", None) or default_geo_dir()

    ip: str | None = None
    problem: str | None = None
    try:
        raw = await fetcher()
        ip = str(ipaddress.ip_address(str(raw).strip()))
    except ValueError:
        problem = "the public IP service returned something that is not an IP address"
    except Exception as exc:  # offline, DNS failure, HTTP error: all mean "unknown"
        problem = f"cannot find the public IP address ({_short(exc)})"

    cc, asn, name = UNKNOWN_CC, UNKNOWN_ASN, None
    if ip is not None:
        try:
            with GeoDB(directory) as db:
                cc, asn, name = db.lookup(ip)
        except GeoError as exc:
            problem = str(exc)
        else:
            if cc == UNKNOWN_CC or asn == UNKNOWN_ASN:
                problem = "the public IP address is not in the geolocation database (try `vantage geo update`)"

    if asn_override and asn_override != asn:
        name = None  # the looked-up name belongs to another network
    cc = cc_override or cc
    asn = asn_override or asn
    warning = None
    if problem and not (cc_override and asn_override):
        warning = f"probe location unknown ({cc}, {asn}): {problem}"
    return ProbeLocation(cc, asn, name, warning, ip)
