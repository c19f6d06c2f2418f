"""`vantage geo update|lookup|where`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from probes.config import load_config
from probes.geo import DEFAULT_TIMEOUT, GeoDB, discover_probe_location, update_geo

from .common import safe


def _geo_dir(explicit: str | None) -> Path:
    return Path(explicit) if explicit else Path(load_config().geo_db)


_dir_option = click.option("--dir", "directory", type=click.Path(file_okay=False),
                           help="Database directory (default: the geo_db setting).")


@click.group("geo")
def geo() -> None:
    """Geolocation databases (country and ASN of the probe)."""


@geo.command("update")
@_dir_option
@click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds allowed for the whole download.")
def update(directory: str | None, timeout: float) -> None:
    """Download the ASN and country databases (OONI probe-assets; mirror: VANTAGE_GEO_URL)."""
    paths = update_geo(dest=_geo_dir(directory), timeout=timeout)
    with GeoDB(next(iter(paths.values())).parent) as db:
        for kind, meta in db.metadata().items():
            click.echo(f"{safe(kind)}: {safe(meta['type'])} -> {safe(paths[kind])}")


@geo.command("lookup")
@click.argument("ips", nargs=-1, required=True, metavar="IP...")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def lookup(ips: tuple[str, ...], directory: str | None, as_json: bool) -> None:
    """Country and ASN of addresses, from the local databases (no network traffic)."""
    with GeoDB(_geo_dir(directory)) as db:
        rows = [dict(zip(("ip", "cc", "asn", "network_name"), (ip, *db.lookup(ip)))) for ip in ips]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo("\t".join(safe(row[k] or "") for k in ("ip", "cc", "asn", "network_name")))


@geo.command("where")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def where(as_json: bool) -> None:
    """The location measurements will record (asks api.ipify.org for the public IP; never prints it)."""
    location = asyncio.run(discover_probe_location(load_config()))
    if location.warning:
        click.echo(f"vantage: warning: {safe(location.warning)}", err=True)
    if as_json:
        click.echo(json.dumps(location.as_dict(), indent=2))
    else:
        click.echo(safe(f"{location.cc} {location.asn} {location.network_name or ''}".rstrip()))
