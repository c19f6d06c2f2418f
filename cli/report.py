"""`vantage report`: a country's report (HTML, Markdown, SVG charts, data files)."""

from __future__ import annotations

import click

from analysis.db import connect
from analysis.report import build

from .common import db_option, json_option, resolve_db, safe, to_json


@click.command("report")
@click.option("--country", required=True, metavar="CC", help="Two-letter country code of the measurements (probe_cc).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="First day (UTC, YYYY-MM-DD) to include.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last day (UTC, YYYY-MM-DD) to include.")
@click.option("--asn", "asns", multiple=True, metavar="ASN", help="Only this network (AS1234 or 1234; repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write the report into.")
@db_option
@json_option
def report(country, since, until, asns, out_dir, db_path, as_json):
    """Write a self-contained report of a country's measurements: index.html, report.md, charts, data/.

    Run `vantage analyze` first: the report reads the verdicts."""
    con = connect(resolve_db(db_path))
    try:
        result = build(con, country=country, out_dir=out_dir, since=since.date() if since else None,
                       until=until.date() if until else None, asns=asns)
    finally:
        con.close()
    if as_json:
        click.echo(to_json(result.to_dict()))
        return
    f = result.findings
    click.echo(f"report for {result.country}: {result.measurements} measurements on {result.networks} networks; "
               f"{f['confirmed']} confirmed and {f['anomaly']} anomaly findings, {result.changes} change points")
    if result.unanalysed:
        click.echo(f"warning: {result.unanalysed} measurements have no verdict (run `vantage analyze`)", err=True)
    click.echo(f"written: {safe(result.out_dir / 'index.html')} ({len(result.files)} files)")
