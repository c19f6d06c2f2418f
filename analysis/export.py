"""Our measurements out of the database: OONI's data format, and Parquet.

``export_ooni``: one OONI measurement (df-000 base format, Web Connectivity
test keys as ts-017 has them) per line of a ``.jsonl.gz``, so our volunteers'
measurements can join OONI's dataset, and ``vantage import ooni`` reads them
back into the same rows. The stored record is OONI-shaped already; the export
undoes what the importer (probes/ooni_import.py) does:

* ``engine: system`` is OONI's ``getaddrinfo``; late DNS responses
  (``x_response_index >= 1``) go back to ``x_dns_duplicate_responses``.
* requests get OONI's ``address`` beside our ``x_address``.
* response bodies, stored once in ``http_transactions.body`` (the first
  64 KiB), go back into ``test_keys.requests[].response.body``.
* our verdict fills OONI's ``blocking``/``accessible`` (and ``x_verdict``
  keeps ours whole); our measurement id is ``x_measurement_id``, which the
  importer takes as the id, so re-importing our own export adds nothing.
* ``probe_ip`` is ``127.0.0.1``, as OONI publishes it (we never store it).

``export_parquet``: measurements, every observation table and verdicts as
Parquet, hive-partitioned by day and probe country
(``TABLE/day=YYYY-MM-DD/probe_cc=CC/data_0.parquet``). Each table is written
to a temporary folder beside the target and each of its partitions swapped
into place in one atomic step, so a re-export of a period replaces that
period's partitions (a reader sees the old or the new one, never neither) and
leaves the others alone.

The analysis package owns this because the export reads the verdicts; it
reads the probe's tables by name only (never imports probes/).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import duckdb

from core.download import exchange
from core.errors import VantageError
from core.ooni_format import ooni_verdict, to_ooni  # shared with the uploader (probes/upload.py)


class ExportError(VantageError):
    """An export that cannot be written (bad folder, no such table): one line."""


def _period(since: dt.datetime | None, until: dt.datetime | None) -> tuple[str, list[Any]]:
    where, params = [], []
    if since is not None:
        where.append("m.start_time >= ?")
        params.append(since)
    if until is not None:
        where.append("m.start_time < ?")
        params.append(until)
    return (" AND ".join(where) or "true"), params


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND NOT temporary",
                            [name]).fetchone()[0])


def iter_ooni(con: duckdb.DuckDBPyConnection, since: dt.datetime | None = None, until: dt.datetime | None = None,
              batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Our measurements of the period as OONI measurements, by measurement id."""
    where, params = _period(since, until)
    verdicts = _has_table(con, "verdicts")
    select = ("SELECT m.measurement_id, m.record, m.category_code, "
              + ("v.status, v.layer, v.method" if verdicts else "NULL, NULL, NULL")
              + " FROM measurements m" + (" LEFT JOIN verdicts v USING (measurement_id)" if verdicts else "")
              + f" WHERE {where} ORDER BY m.measurement_id")
    cursor = con.cursor()
    cursor.execute(select, params)
    bodies_con = con.cursor()
    while True:
        rows = cursor.fetchmany(batch)
        if not rows:
            break
        ids = [r[0] for r in rows]
        bodies: dict[str, list[str | None]] = {}
        for mid, body in bodies_con.execute(
                "SELECT measurement_id, body FROM http_transactions WHERE side = 'probe' AND measurement_id IN "
                "(SELECT unnest(?::VARCHAR[])) ORDER BY measurement_id, rowid", [ids]).fetchall():
            bodies.setdefault(mid, []).append(body)
        for mid, text, category, status, layer, method in rows:
            record = json.loads(text) if text else {"measurement_id": mid}
            record["measurement_id"] = mid
            yield to_ooni(record, bodies.get(mid, []), (status, layer, method), category)


def export_ooni(con: duckdb.DuckDBPyConnection, out: str | os.PathLike, since: dt.datetime | None = None,
                until: dt.datetime | None = None) -> int:
    """Write the period's measurements to ``out`` (``.jsonl.gz``, one OONI
    measurement per line; written beside it, then renamed). Returns how many."""
    target = Path(out)
    if not target.parent.is_dir():
        raise ExportError(f"no such folder for the export: {target.parent}")
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    count = 0
    try:
        with gzip.open(temp, "wt", encoding="utf-8", compresslevel=6) as fh:
            for measurement in iter_ooni(con, since, until):
                fh.write(json.dumps(measurement, ensure_ascii=False, default=str) + "\n")
                count += 1
        os.replace(temp, target)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        temp.unlink(missing_ok=True)
    return count


# --- Parquet -------------------------------------------------------------------


def exported_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """measurements, every table with a measurement_id (observations, verdicts)."""
    names = {r[0] for r in con.execute(
        "SELECT DISTINCT table_name FROM duckdb_columns() WHERE column_name = 'measurement_id' AND NOT internal "
        "AND schema_name = 'main' AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE NOT temporary)").fetchall()}
    if "measurements" not in names:
        raise ExportError("not a Vantage database: no measurements table")
    return ["measurements"] + sorted(names - {"measurements"})


def _quote_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def export_parquet(con: duckdb.DuckDBPyConnection, out: str | os.PathLike, since: dt.datetime | None = None,
                   until: dt.datetime | None = None) -> dict[str, int]:
    """Write every table as hive-partitioned Parquet under ``out``
    (``TABLE/day=…/probe_cc=…/``); returns rows written per table. The
    partitions of the period are replaced (one atomic swap each), others stay."""
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {root}: {exc.strerror}") from None
    where, params = _period(since, until)
    staging = root / f".export-{uuid.uuid4().hex[:8]}"
    counts: dict[str, int] = {}
    try:
        for table in exported_tables(con):
            staged = staging / table
            staged.mkdir(parents=True)
            if table == "measurements":
                select = (f"SELECT m.* EXCLUDE (probe_cc), {_DAY} AS day, coalesce(m.probe_cc, 'ZZ') AS probe_cc "
                          f"FROM measurements m WHERE {where}")
            else:
                select = (f"SELECT t.*, {_DAY} AS day, coalesce(m.probe_cc, 'ZZ') AS probe_cc "
                          f"FROM {table} t JOIN measurements m USING (measurement_id) WHERE {where}")
            counts[table] = con.execute(f"SELECT count(*) FROM ({select})", params).fetchone()[0]
            if not counts[table]:
                continue
            con.execute(f"COPY ({select}) TO {_quote_path(staged)} (FORMAT PARQUET, PARTITION_BY (day, probe_cc), "
                        "OVERWRITE_OR_IGNORE)", params)
            _swap_partitions(staged, root / table, staging)
    except duckdb.Error as exc:
        raise ExportError(f"the Parquet export failed: {str(exc).strip().splitlines()[0]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


_DAY = "coalesce(strftime(m.start_time, '%Y-%m-%d'), 'unknown')"


def _swap_partitions(staged: Path, target: Path, staging: Path) -> None:
    """Move each staged ``day=/probe_cc=`` folder into ``target``, replacing
    the one there in one atomic exchange (``core.download.exchange``; two
    renames where the system has none), then delete the old one."""
    for day in sorted(p for p in staged.iterdir() if p.is_dir()):
        for country in sorted(p for p in day.iterdir() if p.is_dir()):
            final = target / day.name / country.name
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists() and exchange(country, final):
                shutil.rmtree(country, ignore_errors=True)  # the old partition, now at the staged name
                continue
            old = staging / f"old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.rename(final, old)
            os.rename(country, final)
            shutil.rmtree(old, ignore_errors=True)
