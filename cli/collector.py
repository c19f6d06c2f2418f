"""`vantage collector serve`: the central collector (bk-003)."""

from __future__ import annotations

import asyncio

import click


@click.group()
def collector() -> None:
    """The central collector: volunteers upload measurements to it (OONI's bk-003 protocol)."""


@collector.command()
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Address for uploads (put a TLS reverse proxy in front; see docs/collector.md).")
@click.option("--db", "db", required=True, type=click.Path(dir_okay=False),
              help="The central DuckDB database (an ordinary Vantage database).")
@click.option("--spool", "spool", required=True, type=click.Path(file_okay=False),
              help="Folder of the append-only spool: what is acknowledged is here until it is in the database.")
@click.option("--metrics-listen", default="127.0.0.1:8471", show_default=True, metavar="HOST:PORT",
              help="Address for /healthz and /metrics (Prometheus); keep it private.")
@click.option("--max-body", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="Largest request body in bytes (also once gunzipped).")
@click.option("--max-batch", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most measurements in one x_batch request.")
@click.option("--rate-per-minute", type=click.IntRange(min=0), default=1200, show_default=True,
              help="Requests per client per minute; 0 disables.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests handled at once; more get 503 with Retry-After.")
@click.option("--trust-forwarded-for", is_flag=True,
              help="Rate-limit by the last X-Forwarded-For entry (only behind your own reverse proxy).")
def serve(listen: str, db: str, spool: str, metrics_listen: str, max_body: int, max_batch: int,
          rate_per_minute: int, max_in_flight: int, trust_forwarded_for: bool) -> None:
    """Accept measurements until SIGTERM, then ingest what is spooled and exit."""
    from services.collector import CollectorConfig, serve_forever

    config = CollectorConfig(listen=listen, db=db, spool=spool, metrics_listen=metrics_listen, max_body=max_body,
                             max_batch=max_batch, rate_per_minute=rate_per_minute, max_in_flight=max_in_flight,
                             trust_forwarded_for=trust_forwarded_for)
    asyncio.run(serve_forever(config))
