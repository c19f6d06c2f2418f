"""`vantage analyze` and `vantage fingerprints update`."""

from __future__ import annotations

import click

from analysis import fingerprints as fp
from analysis.db import connect
from analysis.engine import analyze as run_analysis, summary

from .common import cell, console, db_option, json_option, resolve_db, safe, to_json


@click.command("analyze")
@db_option
@click.option("--public-network", "public_networks", multiple=True, metavar="CIDR",
              help="Treat addresses in CIDR as public, not bogons (repeatable; the lab uses 198.18.0.0/15).")
@click.option("--fingerprints-dir", type=click.Path(file_okay=False), envvar="VANTAGE_FINGERPRINTS_DIR",
              help="Fingerprint files (default: the cache filled by `vantage fingerprints update`).")
@click.option("--only-missing", is_flag=True, help="Analyse only measurements that have no verdict yet.")
@click.option("--asn-db", type=click.Path(exists=True), metavar="PATH",
              help="IP-to-ASN database (.mmdb, or a directory with asn.mmdb; default: the geo_db setting's, "
                   "when `vantage geo update` installed it): answers in the control's AS are consistent.")
@click.option("--engine", type=click.Choice(["duckdb", "spark"]), default="duckdb", show_default=True,
              help="duckdb: the database (--db); spark: the Parquet layout of `vantage export parquet` (--input, --out).")
@click.option("--input", "input_dir", metavar="DIR", help="--engine spark: the exported Parquet folder (or a Spark URL).")
@click.option("--out", "out_dir", metavar="DIR", help="--engine spark: where verdicts/ and the agg_* views go, same layout.")
@click.option("--master", metavar="URL", help="--engine spark: Spark master (default local[N], N = cores; under "
                                                "spark-submit, its --master).")
@json_option
def analyze(db_path, public_networks, fingerprints_dir, only_missing, asn_db, engine, input_dir, out_dir, master, as_json):
    """Compute verdicts (ok, blocked, throttled, down, server_side, inconclusive) for stored measurements."""
    from probes import store

    if engine == "spark" or input_dir or out_dir or master:
        _analyze_spark(engine, db_path, only_missing, input_dir, out_dir, master, public_networks, fingerprints_dir,
                       asn_db, as_json)
        return

    path = resolve_db(db_path)
    # The measurement schema is the probe's: refuse a newer one, migrate an older one, before the analysis reads it.
    store.connect(path, read_only=True).close()
    # Memory: VANTAGE_ANALYZE_MEMORY, else 1 GB (analysis/db.py says what that costs).
    con = connect(path)
    try:
        count = run_analysis(con, public_networks=public_networks, fingerprints_dir=fingerprints_dir, only_missing=only_missing,
                             asn_db=asn_db or _default_asn_db())
        rows = summary(con)
        version = fp.load(fingerprints_dir).version
    finally:
        con.close()
    if as_json:
        click.echo(to_json({"analysed": count, "fingerprint_set": version, "verdicts": rows}))
        return
    _print_summary(f"{count} measurements analysed", version, rows)


def _print_summary(title: str, version: str, rows: list[dict]) -> None:
    """The verdict counts as a table, with the fingerprint set they were judged with."""
    from rich.table import Table

    # The fingerprint set's version is read from downloaded files: escaped like all network text.
    table = Table(title=cell(f"{title} (fingerprints: {safe(version)})"))
    for name in ("status", "layer", "method", "count", "confirmed"):
        table.add_column(name, justify="right" if name in ("count", "confirmed") else "left")
    for r in rows:
        table.add_row(cell(r["status"]), cell(r["layer"] or ""), cell(r["method"] or ""), cell(r["count"]), cell(r["confirmed"]))
    console().print(table)
    if version == "none":
        click.echo("note: no fingerprints found; run `vantage fingerprints update` to confirm blockpages", err=True)


def _analyze_spark(engine, db_path, only_missing, input_dir, out_dir, master, public_networks, fingerprints_dir,
                   asn_db, as_json):
    """`vantage analyze --engine spark`: analysis/spark.py over the Parquet layout (docs/scale.md)."""
    import sys

    from analysis import spark
    from probes.schema import SCHEMA_SQL

    if engine != "spark":
        raise click.UsageError("--input, --out and --master go with --engine spark")
    if db_path or only_missing:
        raise click.UsageError("--engine spark reads --input (Parquet), not --db; --only-missing is for the database")
    if not input_dir or not out_dir:
        raise click.UsageError("--engine spark needs --input DIR (the Parquet export) and --out DIR")
    spark.check_environment()  # no pyspark / no Java: one line naming what to install, exit 2

    def progress(done, total):
        if not as_json:
            end = "\n" if done == total or not sys.stderr.isatty() else "\r"
            click.echo(f"spark: {done}/{total} partitions judged", err=True, nl=False)
            click.echo(end, err=True, nl=False)

    result = spark.run(input_dir, out_dir, master=master, public_networks=public_networks,
                       fingerprints_dir=fingerprints_dir, asn_db=asn_db or _default_asn_db(), schema_sql=SCHEMA_SQL,
                       progress=progress)
    if as_json:
        click.echo(to_json({"engine": "spark"} | result))
        return
    _print_summary(f"{result['analysed']} measurements analysed on Spark", result["fingerprint_set"], result["verdicts"])
    click.echo(f"{result['partitions']} partitions in {result['tasks']} tasks, {result['seconds']['total']} s; "
               f"verdicts and views in {safe(result['output'])}", err=True)


def _default_asn_db():
    """The ASN database `vantage geo update` installed (geo_db setting), if any."""
    from pathlib import Path

    from probes.config import load_config

    candidate = Path(load_config().geo_db) / "asn.mmdb"
    return candidate if candidate.is_file() else None


@click.group("fingerprints")
def fingerprints():
    """Blockpage and DNS fingerprint sets (OONI, Censored Planet)."""


@fingerprints.command("update")
@click.option("--dir", "directory", type=click.Path(file_okay=False), envvar="VANTAGE_FINGERPRINTS_DIR",
              help="Where to keep the files (default: ~/.cache/vantage/fingerprints).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds allowed for the whole download.")
def update(directory, timeout):
    """Download the current fingerprint sets (URLs: VANTAGE_OONI_FINGERPRINTS_URL, VANTAGE_CP_FINGERPRINTS_URL)."""
    fps = fp.update(directory, timeout=timeout)
    click.echo(f"fingerprints {safe(fps.version)}: {len(fps.http)} HTTP and {len(fps.dns)} DNS patterns in {directory or fp.default_dir()}")
