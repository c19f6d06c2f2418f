"""`vantage analyze` and `vantage fingerprints update`."""

from __future__ import annotations

import json

import click

from cli.common import UsageFailure, db_option, json_option

from . import fingerprints as fp
from .engine import AnalysisError, analyze as run_analysis, summary


@click.command("analyze")
@db_option
@click.option("--public-network", "public_networks", multiple=True, metavar="CIDR",
              help="Treat addresses in CIDR as public, not bogons (repeatable; the lab uses 198.18.0.0/15).")
@click.option("--fingerprints-dir", type=click.Path(file_okay=False), envvar="VANTAGE_FINGERPRINTS_DIR",
              help="Fingerprint files (default: the cache filled by `vantage fingerprints update`).")
@click.option("--only-missing", is_flag=True, help="Analyse only measurements that have no verdict yet.")
@json_option
def analyze(db_path, public_networks, fingerprints_dir, only_missing, as_json):
    """Compute verdicts (ok, blocked, throttled, down, server_side, inconclusive) for stored measurements."""
    import os

    from probes.store import StoreError, connect

    try:
        # The probe's store caps DuckDB at 64 MB for small devices; the analysis
        # joins whole tables and needs room (1.6 GB analyses 1M measurements
        # in ~25 s; less works, spilling to disk).
        from cli.results import resolve_db

        con = connect(resolve_db(db_path), memory_limit=os.environ.get("VANTAGE_ANALYZE_MEMORY", "1GB"))
    except StoreError as exc:
        raise UsageFailure(str(exc)) from None
    try:
        count = run_analysis(con, public_networks=public_networks, fingerprints_dir=fingerprints_dir, only_missing=only_missing)
        rows = summary(con)
        version = fp.load(fingerprints_dir).version
    except AnalysisError as exc:
        raise UsageFailure(str(exc)) from None
    finally:
        con.close()
    if as_json:
        click.echo(json.dumps({"analysed": count, "fingerprint_set": version, "verdicts": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{count} measurements analysed (fingerprints: {version})")
    for name in ("status", "layer", "method", "count", "confirmed"):
        table.add_column(name, justify="right" if name in ("count", "confirmed") else "left")
    for r in rows:
        table.add_row(r["status"], r["layer"] or "", r["method"] or "", str(r["count"]), str(r["confirmed"]))
    Console().print(table)
    if version == "none":
        click.echo("note: no fingerprints found; run `vantage fingerprints update` to confirm blockpages", err=True)


@click.group("fingerprints")
def fingerprints():
    """Blockpage and DNS fingerprint sets (OONI, Censored Planet)."""


@fingerprints.command("update")
@click.option("--dir", "directory", type=click.Path(file_okay=False), envvar="VANTAGE_FINGERPRINTS_DIR",
              help="Where to keep the files (default: ~/.cache/vantage/fingerprints).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds allowed for the whole download.")
def update(directory, timeout):
    """Download the current fingerprint sets (URLs: VANTAGE_OONI_FINGERPRINTS_URL, VANTAGE_CP_FINGERPRINTS_URL)."""
    try:
        fps = fp.update(directory, timeout=timeout)
    except fp.FingerprintError as exc:
        raise UsageFailure(str(exc)) from None
    click.echo(f"fingerprints {fps.version}: {len(fps.http)} HTTP and {len(fps.dns)} DNS patterns in {directory or fp.default_dir()}")
