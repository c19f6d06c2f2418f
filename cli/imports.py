"""`vantage import ooni PATH...`: OONI's measurement files into our tables.

Exit codes: 0 every record read was imported (or was already there, or was
another test, counted and skipped); 3 the import was partial: some records
(or a truncated file's tail) could not be read or stored — they are listed
with file and line, and everything else is stored; 2 a path that does not
exist or a database that cannot be opened (nothing imported).
"""

from __future__ import annotations

import sys

import click

from .common import console, db_option, json_option, resolve_db, safe, to_json

PARTIAL_EXIT = 3
ERRORS_SHOWN = 20


@click.group(name="import")
def import_group() -> None:
    """Import measurements made by other tools into the database."""


@import_group.command(name="ooni")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@db_option
@json_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def ooni(paths: tuple[str, ...], db_path: str | None, as_json: bool, quiet: bool) -> None:
    """Import OONI measurements: .json, .jsonl, .jsonl.gz files, or directories
    of them as OONI publishes them (walked recursively).

    Web Connectivity measurements are stored in the same tables as ours
    (with OONI's own verdict in measurements.ooni_blocking/ooni_accessible);
    other tests are counted and skipped. Importing a file twice adds nothing.
    Run `vantage analyze` afterwards. Exit code 3: partial import (bad records
    listed with file and line; everything else stored)."""
    from probes.ooni_import import import_ooni
    from probes.store import connect

    con = connect(resolve_db(db_path))
    try:
        with _Progress(quiet) as progress:
            summary = import_ooni(con, paths, on_progress=progress)
    finally:
        con.close()
    if as_json:
        click.echo(to_json(summary.as_dict()))
    else:
        _print(summary)
    for error in summary.errors[:ERRORS_SHOWN]:
        click.echo(f"vantage: bad record: {safe(error)}", err=True)
    if summary.bad > ERRORS_SHOWN:
        click.echo(f"vantage: ... {summary.bad - ERRORS_SHOWN} more bad records (--json lists up to "
                   f"{len(summary.errors)})", err=True)
    if summary.partial:
        click.echo(f"vantage: partial import: {summary.bad} bad records skipped, {summary.imported} measurements "
                   "imported", err=True)
        sys.exit(PARTIAL_EXIT)


class _Progress:
    """A byte-count progress bar on stderr (compressed bytes read of all files)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self.progress = Progress("[bold]importing", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=console(stderr=True), transient=True)
        self.progress.__enter__()
        self.task = self.progress.add_task("import", total=None)
        return self.update

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if not self.quiet:
            self.progress.__exit__(*exc)


def _print(summary) -> None:
    out = console()
    out.print(f"files read: {summary.files}, records: {summary.records}")
    out.print(f"imported: {summary.imported} web_connectivity measurements"
              + (f" (versions {', '.join(f'{safe(v)}: {n}' for v, n in sorted(summary.versions.items()))})"
                 if summary.versions else ""), markup=False, highlight=False, emoji=False)
    out.print(f"already stored (or twice in the input): {summary.duplicates}", highlight=False)
    if summary.skipped:
        skipped = ", ".join(f"{safe(name)}: {n}" for name, n in sorted(summary.skipped.items()))
        out.print(f"other tests skipped: {sum(summary.skipped.values())} ({skipped})", markup=False, highlight=False,
                  emoji=False)
    if summary.not_measurements:
        out.print(f"not measurements (no test keys): {summary.not_measurements}", highlight=False)
    out.print(f"bad records: {summary.bad}", highlight=False)
