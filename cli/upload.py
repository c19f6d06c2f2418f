"""`vantage upload`: send the measurements not yet acknowledged to a collector."""

from __future__ import annotations

import asyncio

import click

from .common import db_option, json_option, resolve_db, safe, to_json


@click.command()
@click.option("--collector", "collector", metavar="URL",
              help="The collector (OONI bk-003; default: the collector_url setting).")
@click.option("--socks5", "socks5", metavar="HOST:PORT",
              help="Upload through this SOCKS5 proxy, which also resolves the name (e.g. Tor: 127.0.0.1:9050).")
@click.option("--pending", "only_pending", is_flag=True, help="Only say how many measurements are pending; send nothing.")
@db_option
@json_option
def upload(collector: str | None, socks5: str | None, only_pending: bool, db_path: str | None, as_json: bool) -> None:
    """Send every measurement the collector has not acknowledged yet; say what
    is still pending. Exit 3 when some could not be sent (offline, refused):
    they stay pending, and the next `vantage upload` sends them."""
    from probes import store
    from probes.config import load_config
    from probes.upload import check_collector, pending_count
    from probes.upload import upload as send

    url = check_collector(collector or load_config().collector_url)
    con = store.connect(resolve_db(db_path))
    try:
        if only_pending:
            count = pending_count(con, url)
            click.echo(to_json({"collector": url, "pending": count}) if as_json
                       else f"{count} measurements pending for {url}")
            return
        summary = asyncio.run(send(con, url, socks5=socks5))
    finally:
        con.close()
    if as_json:
        click.echo(to_json(summary.as_dict()))
    else:
        click.echo(f"{summary.uploaded} measurements uploaded to {url}; {summary.pending} pending")
        if summary.offline:
            click.echo("the collector could not be reached: nothing is lost, the next `vantage upload` sends the rest",
                       err=True)
        if summary.refused:
            click.echo(f"{summary.refused} refused by the collector (they stay pending):", err=True)
        for line in summary.errors:
            click.echo(f"  {safe(line)}", err=True)
    if summary.pending:
        raise click.exceptions.Exit(3)
