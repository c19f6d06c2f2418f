"""The analysis's own door to a Vantage database.

The analysis reads what the probe stored and writes the tables it owns
(``verdicts``, the ``agg_*`` views); it never imports the probe's store.
``connect(path)`` opens an existing database only: a mistyped path is an
error naming the path, never a new empty database (or directory) that
``vantage analyze`` would then report as analysed.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import duckdb

from core.errors import VantageError
from core.paths import default_db_path
from core.schema_version import SCHEMA_VERSION

# DuckDB's own default is 80% of RAM; the analysis joins whole tables and gets
# 1 GB unless VANTAGE_ANALYZE_MEMORY says otherwise. Below ~1.2 GB a million
# measurements no longer fit and DuckDB spills its stage tables to disk (slower,
# not failing); the measured figures are in docs/benchmarks.md.
MEMORY_ENV = "VANTAGE_ANALYZE_MEMORY"
DEFAULT_MEMORY = "1GB"
_MEMORY = re.compile(r"\s*\d+(\.\d+)?\s*([KMGT]i?)?B\s*", re.IGNORECASE)

# What the probe writes and the rules read (probes/schema.sql).
OBSERVATION_TABLES = frozenset({"measurements", "dns_answers", "tcp_connects", "tls_handshakes",
                                "http_transactions", "network_events", "throughput_samples"})
# A database made by an older Vantage is brought up to date when the probe's
# store opens it (any `vantage results` command); the analysis never migrates
# the probe's tables itself. It compares the version in `schema_migrations`
# with core's SCHEMA_VERSION (which probes/schema.py's MIGRATIONS end at), and,
# for a database without that table, looks for what later versions added that
# the rules read (MIGRATIONS 3, 4 and 6).
NEWER_COLUMNS = (("measurements", "ooni_blocking"), ("tcp_connects", "attempt"), ("tls_handshakes", "attempt"),
                 ("http_transactions", "attempt"), ("ip_info", "asn"), ("packets", "injected"))
_UPDATE = "run `vantage results list --db PATH` once to bring it up to date, then analyse it"


class AnalysisError(VantageError):
    """A problem the user can fix (no such database, bad CIDR, not a Vantage database): one line."""


def connect(path: str | os.PathLike | None = None, *, memory_limit: str | None = None,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open the Vantage database at ``path`` (default: core.paths.default_db_path())
    for analysis, with the ``verdicts`` table in place.

    ``memory_limit``: DuckDB's buffer pool (default: $VANTAGE_ANALYZE_MEMORY or
    1GB); ``threads``: DuckDB's worker threads (default: all cores). Raises
    AnalysisError when the file does not exist, cannot be opened (locked by a
    running probe, not a DuckDB file) or holds no Vantage tables."""
    target = Path(path) if path else default_db_path()
    if not target.exists():
        raise AnalysisError(f"no database at {target} (run `vantage run` first, or pass --db)")
    if not target.is_file():
        raise AnalysisError(f"{target} is not a database file")
    limit = memory_limit or os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY
    if not _MEMORY.fullmatch(limit):
        raise AnalysisError(f"the analysis memory limit {limit!r} ({MEMORY_ENV}) is not a size such as 1GB or 512MB")
    try:
        con = duckdb.connect(str(target))
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"cannot open the database {target}: {first}") from None
    try:
        con.execute(f"SET memory_limit = '{limit.strip()}'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        ensure_schema(con)
    except BaseException:
        con.close()
        raise
    return con


def tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary").fetchall()}


def _schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The highest migration recorded in ``schema_migrations``, or None
    without that table."""
    if "schema_migrations" not in tables(con):
        return None
    return con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Check that ``con`` holds a Vantage database and create the analysis's
    own table (``verdicts``) if it is missing; idempotent. A database without
    the probe's tables is refused rather than given a verdicts table."""
    missing = OBSERVATION_TABLES - tables(con)
    if missing:
        raise AnalysisError(f"the database lacks the table(s) {', '.join(sorted(missing))} (not a Vantage database?)")
    version = _schema_version(con)
    if version is not None and version < SCHEMA_VERSION:
        raise AnalysisError(f"the database was made by an older Vantage (schema version {version}, "
                            f"this Vantage reads {SCHEMA_VERSION}): {_UPDATE}")
    present = set(con.execute("SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal").fetchall())
    old = [f"{t}.{c}" for t, c in NEWER_COLUMNS if (t, c) not in present]
    if old:
        raise AnalysisError(f"the database was made by an older Vantage (no {', '.join(old)}): {_UPDATE}")
    con.execute(resources.files("analysis").joinpath("sql", "00_verdicts.sql").read_text(encoding="utf-8"))
