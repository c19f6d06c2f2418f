"""Shared CLI plumbing: common options and the database the commands read."""

from __future__ import annotations

import click


def db_option(fn):
    return click.option(
        "--db", "db_path", envvar="VANTAGE_DB", type=click.Path(dir_okay=False),
        help="DuckDB file (default: a file under the user's data directory; env VANTAGE_DB).",
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def resolve_db(db_path: str | None) -> str:
    """--db / VANTAGE_DB, else the config file's `db`: the same file `vantage run` wrote."""
    if db_path:
        return db_path
    from probes.config import load_config

    return load_config().db
