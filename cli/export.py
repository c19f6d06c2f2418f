"""`vantage export ooni` and `vantage export parquet`: our measurements out."""

from __future__ import annotations

import datetime as dt

import click

from .common import db_option, json_option, resolve_db, to_json

_DATE = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"])


def _period(fn):
    fn = click.option("--until", type=_DATE, help="Only measurements started before this date/time (UTC, exclusive).")(fn)
    return click.option("--since", type=_DATE, help="Only measurements started at or after this date/time (UTC).")(fn)


@click.group(name="export")
def export_group() -> None:
    """Export measurements: OONI's data format, or Parquet for other engines."""


@export_group.command(name="ooni")
@db_option
@_period
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The file to write: OONI measurements as JSON lines, gzipped (FILE.jsonl.gz).")
@json_option
def ooni(db_path: str | None, since: dt.datetime | None, until: dt.datetime | None, out: str, as_json: bool) -> None:
    """Our measurements in OONI's data format (one per line), with our verdict
    as OONI's blocking/accessible. `vantage import ooni` reads the file back."""
    from analysis.db import connect
    from analysis.export import export_ooni

    con = connect(resolve_db(db_path))
    try:
        count = export_ooni(con, out, since, until)
    finally:
        con.close()
    click.echo(to_json({"measurements": count, "out": out}) if as_json else f"{count} measurements written to {out}")


@export_group.command(name="parquet")
@db_option
@_period
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="The folder: TABLE/day=YYYY-MM-DD/probe_cc=CC/*.parquet (hive-style).")
@json_option
def parquet(db_path: str | None, since: dt.datetime | None, until: dt.datetime | None, out: str, as_json: bool) -> None:
    """Measurements, every observation table and verdicts as Parquet,
    partitioned by day and probe country. A re-export of a period replaces
    its partitions (each renamed into place); other partitions stay."""
    from analysis.db import connect
    from analysis.export import export_parquet

    con = connect(resolve_db(db_path))
    try:
        counts = export_parquet(con, out, since, until)
    finally:
        con.close()
    if as_json:
        click.echo(to_json({"rows": counts, "out": out}))
        return
    for table, n in counts.items():
        click.echo(f"{table}: {n} rows")
    click.echo(f"written to {out}")
