"""Shared CLI plumbing: the one-line error type and common options."""

from __future__ import annotations

import click


class UsageFailure(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


def db_option(fn):
    return click.option(
        "--db", "db_path", envvar="VANTAGE_DB", type=click.Path(dir_okay=False),
        help="DuckDB file (default: a file under the user's data directory; env VANTAGE_DB).",
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)
