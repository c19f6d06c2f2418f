"""The only code that writes the DuckDB file.

DuckDB allows one writer, so all writes go through one ``Sink``: a bounded
queue drained by a single thread that inserts records in batches, one
``INSERT ... SELECT unnest(?), ...`` a table with one list parameter a column
(no pyarrow to load; ``insert_rows``). Memory stays flat however long the run: at most
``queue_size + batch_size`` records are held at once, and each record's rows
are bounded (probes/flatten.py, docs/schema.md "Bounds").

A record that cannot be stored fails alone: when a batch fails, its records
are retried one by one, and only those that still fail go to the rescue file
(JSON lines; ``import_rescue`` reads it back). Only a database that refuses
every write (closed, disk full) stops the run.

Columns and their types come from schema.sql (probes/schema.py); rows are
dicts keyed by column name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from core import paths
from core.errors import VantageError

from . import schema
from .flatten import STRING_CAP, iter_table_rows

if TYPE_CHECKING:
    import duckdb

# DuckDB is imported where a database is opened, never at import time: the
# measuring process of `vantage run` imports this module (Sink) but leaves
# every database operation to a short-lived process (probes/spool.py), so
# DuckDB's library and allocator never count against the probe's memory.

MIGRATIONS = schema.MIGRATIONS
SCHEMA_VERSION = schema.SCHEMA_VERSION

# A probe on a Raspberry Pi only appends: a small buffer pool (DuckDB spills
# beyond it) and one thread took a 10,000-record write from +84 MB to +55 MB
# of RSS without slowing the run; row groups of 2,048 rows (DuckDB's vector,
# instead of 122,880) keep what a checkpoint holds at once small enough for a
# 16 MB pool: -10 MB more at 10,000 records (bench/probe_bench.py). The row
# group size is the probe connection's, not the file's: analysis connections
# append with DuckDB's default.
PROBE_LIMITS: dict[str, Any] = {"memory_limit": "16MB", "threads": 1, "row_group_size": 2048}


class StoreError(VantageError):
    """A database problem the user can fix (bad path, locked file...): one line."""


def default_db_path() -> Path:
    return paths.default_db_path()


def connect(path: str | os.PathLike | None = None, read_only: bool = False, memory_limit: str | None = None,
            threads: int | None = None, row_group_size: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open (and migrate) the database, or raise StoreError with a clear reason.

    ``memory_limit``/``threads``/``row_group_size``: DuckDB's defaults (80% of
    RAM, all cores) suit analysis; the probe passes ``**PROBE_LIMITS``.

    A database of a newer schema than this build knows is refused (StoreError);
    an older one is migrated, also when opened read-only (briefly read-write)."""
    target = Path(path) if path else default_db_path()
    if str(target) != ":memory:":
        if read_only and not target.exists():  # before mkdir: a mistyped path must create nothing
            raise StoreError(f"no database at {target} (run `vantage run` first, or pass --db)")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory for the database {target}: {exc.strerror}") from None
        if not read_only and target.exists() and not os.access(target, os.W_OK):
            raise StoreError(f"the database {target} is not writable")
        if not read_only and not target.exists() and not os.access(target.parent, os.W_OK):
            raise StoreError(f"cannot write the database in {target.parent}: permission denied")
    con = _open(target, read_only, row_group_size)
    try:
        version = schema_version(con)
        check_version(version, target)
        if read_only and version is not None and version < SCHEMA_VERSION:
            con.close()
            migrating = _open(target, False)
            import duckdb

            try:
                migrate(migrating)
            except duckdb.Error as exc:
                raise StoreError(f"the database {target} needs migrating to schema version {SCHEMA_VERSION} "
                                 f"and that failed: {_first_line(exc)}") from None
            finally:
                migrating.close()
            con = _open(target, True, row_group_size)
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        if not read_only:
            migrate(con)
    except BaseException:
        con.close()
        raise
    return con


def _open(target: Path, read_only: bool, row_group_size: int | None = None) -> duckdb.DuckDBPyConnection:
    import duckdb

    try:
        if not row_group_size or str(target) == ":memory:":
            return duckdb.connect(str(target), read_only=read_only)
        # The row group size is an option of ATTACH only: the file attached and made the default catalog,
        # spilling where DuckDB spills for a file it opens itself (``<db>.tmp``), not in the working directory.
        con = duckdb.connect()
        try:
            path = str(target).replace("'", "''")
            con.execute(f"SET temp_directory = '{path}.tmp'")
            con.execute(f"ATTACH '{path}' AS probe_db (ROW_GROUP_SIZE {int(row_group_size)}"
                        f"{', READ_ONLY' if read_only else ''})")
            con.execute("USE probe_db")
        except BaseException:
            con.close()
            raise
        return con
    except duckdb.Error as exc:
        raise StoreError(f"cannot open the database {target}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The highest migration applied, or None for a database without one (new)."""
    found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations' "
                        "AND table_schema = 'main'").fetchone()[0]
    if not found:
        return None
    return con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]


def check_version(version: int | None, where: Any = "the database") -> None:
    """Refuse a database written by a newer Vantage: writing to it would put
    every record in the rescue file, and reading it would misread changed
    columns."""
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(f"{where} has schema version {version}, newer than this Vantage knows ({SCHEMA_VERSION}): "
                         "upgrade Vantage, or use another database (--db)")


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Bring the database to SCHEMA_VERSION: a new one gets schema.sql and
    every version at once; an older one the numbered migrations it lacks, each
    in its own transaction."""
    version = schema_version(con)
    check_version(version)
    if version is None or version < 1:
        con.execute("BEGIN")
        con.execute(schema.SCHEMA_SQL)
        for number, name, _ in MIGRATIONS:
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?) ON CONFLICT DO NOTHING", [number, name])
        con.execute("COMMIT")
        return
    for number, name, sql in MIGRATIONS:
        if number <= version:
            continue
        con.execute("BEGIN")
        try:
            if sql:
                con.execute(sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, name])
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except Exception:  # no transaction left, or the connection is gone: the first error matters
        pass


# --- Values: a malformed field becomes NULL, never a failed record ----------

_INT_RANGE = {"INTEGER": (-2**31, 2**31 - 1), "BIGINT": (-2**63, 2**63 - 1)}


def _text(value: Any) -> Any:
    """DuckDB refuses strings that are not valid UTF-8, and undecodable bytes
    from the network (headers, bodies) reach us as lone surrogates: replace
    them rather than lose the record. Longer than STRING_CAP: cut."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else str(value)
    return _utf8(value[:STRING_CAP] if len(value) > STRING_CAP else value)


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _json(value: Any) -> Any:
    """JSON columns: the flattener's JSON text (never cut: cut JSON is not JSON)."""
    if value is None:
        return None
    return _utf8(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))


def _integer(low: int, high: int) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        if type(value) is int:
            return value if low <= value <= high else None
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return coerce(int(value))
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return coerce(int(value))
        return None
    return coerce


def _double(value: Any) -> Any:
    if type(value) is float or value is None:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _boolean(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def _timestamp(value: Any) -> Any:
    return value if isinstance(value, (dt.datetime, dt.date)) else None


def _coercer(column_type: str) -> Callable[[Any], Any]:
    if column_type in _INT_RANGE:
        return _integer(*_INT_RANGE[column_type])
    return {"DOUBLE": _double, "BOOLEAN": _boolean, "TIMESTAMP": _timestamp, "JSON": _json}.get(column_type, _text)


_COERCE: dict[str, dict[str, Callable[[Any], Any]]] = {
    table: {c.name: _coercer(c.type) for c in columns} for table, columns in schema.TABLES.items()
}

_CHUNK_ROWS = 500  # rows per INSERT: one statement, bounded list lengths
_CHUNK_BYTES = 2 * 1024 * 1024  # ...and bounded size: bodies can be 64 KiB each


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows given by column name (a column a row leaves out is NULL, or
    its DEFAULT when no row of the statement names it). Column order and
    types come from schema.sql; a value of the wrong type becomes NULL."""
    coerce = _COERCE[table]
    types = _TYPES[table]
    # INSERT OR IGNORE: re-importing the same measurement is harmless.
    verb = "INSERT OR IGNORE" if table == "measurements" else "INSERT"

    def flush(chunk: list[dict[str, Any]]) -> None:
        named = set().union(*chunk)
        unknown = named - coerce.keys()
        if unknown:
            raise KeyError(f"{table} has no column {', '.join(sorted(unknown))} (schema.sql)")
        columns = [c for c in coerce if c in named]
        # One list parameter a column, unnested side by side: DuckDB binds a
        # multi-row VALUES a parameter at a time (~30 us each), which made
        # storing the probe's spool a third of a volunteer's run.
        lists = ", ".join(f"unnest(?::{types[c]}[])" for c in columns)
        con.execute(f"{verb} INTO {table} ({', '.join(columns)}) SELECT {lists}",
                    [[coerce[c](row.get(c)) for row in chunk] for c in columns])

    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += sum(len(v) for v in row.values() if isinstance(v, str))
        if len(chunk) >= _CHUNK_ROWS or size >= _CHUNK_BYTES:
            flush(chunk)
            chunk, size = [], 0
    if chunk:
        flush(chunk)


# --- Columnar inserts (imports): the same rows and coercions, via Arrow -------

_ARROW_TYPES = {"VARCHAR": "string", "JSON": "string", "INTEGER": "int32", "BIGINT": "int64", "DOUBLE": "float64",
                "BOOLEAN": "bool_", "TIMESTAMP": "timestamp"}
# Python types a column's values may have for Arrow to take them as they are
# (anything else goes through the column's coercer first, as insert_rows does).
_EXACT = {"VARCHAR": (str,), "JSON": (str,), "INTEGER": (int,), "BIGINT": (int,), "DOUBLE": (float, int),
          "BOOLEAN": (bool,), "TIMESTAMP": (dt.datetime,)}
_TYPES = {table: {c.name: c.type for c in columns} for table, columns in schema.TABLES.items()}


def _arrow_column(values: list[Any], column_type: str, coerce: Callable[[Any], Any]):
    import pyarrow as pa
    import pyarrow.compute as pc

    name = _ARROW_TYPES.get(column_type, "string")
    arrow_type = pa.timestamp("us") if name == "timestamp" else getattr(pa, name)()
    kinds = set(map(type, values))
    kinds.discard(type(None))
    if kinds <= set(_EXACT.get(column_type, (str,))):
        try:
            array = pa.array(values, arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeError, ValueError, TypeError):
            array = None  # out of range, lone surrogates...: the coercer decides, value by value
        if array is not None and (column_type != "VARCHAR" or not len(array)
                                  or (pc.max(pc.utf8_length(array)).as_py() or 0) <= STRING_CAP):
            return array
    return pa.array([coerce(v) for v in values], arrow_type)


def arrow_table(table: str, rows: list[dict[str, Any]]):
    """The rows of ``table`` as one Arrow table: the columns the rows name, in
    schema order, each value coerced as ``insert_rows`` would (a value of the
    wrong type becomes NULL)."""
    import pyarrow as pa

    coerce = _COERCE[table]
    named = set().union(*rows)
    unknown = named - coerce.keys()
    if unknown:
        raise KeyError(f"{table} has no column {', '.join(sorted(unknown))} (schema.sql)")
    columns = [c for c in coerce if c in named]
    types = _TYPES[table]
    # Row by row into tuples, then zip: each row dict is read once (reading
    # every row once per column was a third of the cost).
    values = zip(*[tuple(map(row.get, columns)) for row in rows])
    arrays = [_arrow_column(list(column), types[c], coerce[c]) for column, c in zip(values, columns)]
    return pa.Table.from_arrays(arrays, names=columns)


def arrow_tables(batch: list[tuple[dict[str, Any], str | None]]) -> dict[str, Any]:
    """A batch of records flattened (probes/flatten.py) into one Arrow table
    per table it fills: what ``insert_tables`` writes, and what a process
    that flattens can hand to the one that writes."""
    return {table: arrow_table(table, rows) for table, rows in iter_table_rows(batch)}


def arrow_tables_each(batch: list[tuple[dict[str, Any], str | None]],
                      on_failure: Callable[[tuple[dict[str, Any], str | None], BaseException], None]
                      ) -> tuple[dict[str, Any], list[str]]:
    """``arrow_tables`` of a batch of distinct records, and their ids; a
    record that cannot be flattened fails alone (``on_failure`` gets it)."""
    try:
        return arrow_tables(batch), [record["measurement_id"] for record, _ in batch]
    except Exception:
        pass
    good = []
    for item in batch:
        try:
            arrow_tables([item])
        except Exception as exc:
            on_failure(item, exc)
        else:
            good.append(item)
    return arrow_tables(good), [record["measurement_id"] for record, _ in good]


def insert_columns(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """``insert_rows`` for bulk imports: the same rows, columns and coercions
    (a value of the wrong type becomes NULL), inserted as one Arrow table per
    call: faster again than ``insert_rows``' lists, at the cost of loading pyarrow
    (which the probe does not: see docs/benchmarks.md)."""
    _insert_arrow(con, table, arrow_table(table, rows))


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data, where: str = "", returning: bool = False):
    verb = "INSERT OR IGNORE" if table == "measurements" else "INSERT"
    view = f"_vantage_insert_{table}"
    con.register(view, data)
    try:
        result = con.execute(f"{verb} INTO {table} ({', '.join(data.column_names)}) SELECT * FROM {view}{where}"
                             + (" RETURNING measurement_id" if returning else ""))
        rows = result.fetchall() if returning else None
    except BaseException:
        # In the transaction the failed statement aborted, the unregister
        # fails too ("Current transaction is aborted"): the statement's own
        # error (a constraint, Ctrl-C) is the one to raise and report.
        with contextlib.suppress(Exception):
            con.unregister(view)
        raise
    con.unregister(view)
    return rows


def insert_tables(con: duckdb.DuckDBPyConnection, tables: dict[str, Any]) -> int:
    """Insert ``arrow_tables``' output in one transaction. Measurements
    already stored are skipped with their rows: the measurements go first
    (``INSERT OR IGNORE ... RETURNING`` says which are new), and when some
    were not, the other tables take only the new ones' rows. Returns how
    many measurements were new."""
    import pyarrow as pa

    measurements = tables.get("measurements")
    if measurements is None or not measurements.num_rows:
        return 0
    con.execute("BEGIN")
    try:
        new = _insert_arrow(con, "measurements", measurements, returning=True)
        where = ""
        if len(new) < measurements.num_rows:
            if not new:
                con.execute("COMMIT")
                return 0
            con.register("_vantage_new", pa.table({"measurement_id": pa.array([r[0] for r in new], pa.string())}))
            where = " WHERE measurement_id IN (SELECT measurement_id FROM _vantage_new)"
        try:
            for table, data in tables.items():
                if table != "measurements" and data.num_rows:
                    _insert_arrow(con, table, data, where)
        finally:
            if where:
                con.unregister("_vantage_new")
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    return len(new)


def only(tables: dict[str, Any], measurement_id: str) -> dict[str, Any]:
    """The rows of one measurement of ``arrow_tables``' output."""
    import pyarrow.compute as pc

    return {table: data.filter(pc.equal(data.column("measurement_id"), measurement_id))
            for table, data in tables.items()}


def insert_each(con: duckdb.DuckDBPyConnection, tables: dict[str, Any], ids: list[str],
                on_failure: Callable[[str, BaseException], None]) -> int:
    """``insert_tables``; when it fails, each measurement of ``ids`` alone,
    so a measurement the database refuses fails alone (``on_failure`` gets
    its id). Returns how many measurements were new."""
    return _alone_on_failure(ids, lambda part: insert_tables(con, tables if part is ids else only(tables, _text(part[0]))),
                             on_failure)


def _alone_on_failure(batch: list, write: Callable[[list], int], on_failure: Callable[[Any, BaseException], None]) -> int:
    """``write(batch)``; when it fails, ``write([item])`` for each item, so an
    item that cannot be stored fails alone (``on_failure(item, exc)``).
    Returns how many were stored. A Ctrl-C that DuckDB turned into its
    InterruptException is no item's failure: on the main thread (where
    Python takes Ctrl-C) it stops the caller, as KeyboardInterrupt (caught
    as a failure, it made an import go on, a record a transaction)."""
    import threading

    main = threading.current_thread() is threading.main_thread()
    try:
        return write(batch)
    except Exception as exc:
        if main and _interrupted(exc):
            raise KeyboardInterrupt from None
        if len(batch) == 1:
            on_failure(batch[0], exc)
            return 0
    stored = 0
    for item in batch:
        try:
            stored += write([item])
        except Exception as exc:
            if main and _interrupted(exc):
                raise KeyboardInterrupt from None
            on_failure(item, exc)
    return stored


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB's answer to a Ctrl-C during a statement:
    its InterruptException, or the Python client's ``RuntimeError: Query
    interrupted``."""
    import duckdb

    return isinstance(exc, duckdb.InterruptException) or (
        type(exc) is RuntimeError and str(exc).startswith("Query interrupted"))


def stored_ids(con: duckdb.DuckDBPyConnection, ids: list[Any]) -> set[str]:
    """Which of ``ids`` are stored already."""
    marks = ",".join("?" * len(ids))
    return {row[0] for row in con.execute(f"SELECT measurement_id FROM measurements WHERE measurement_id IN ({marks})",
                                          [_text(i) for i in ids]).fetchall()}


def write_records(con: duckdb.DuckDBPyConnection, batch: list[tuple[dict[str, Any], str | None]],
                  columnar: bool = False) -> int:
    """Insert a batch of records atomically; records already stored are
    skipped. Returns how many were new. ``columnar``: insert through Arrow
    (``arrow_tables``, ``insert_tables``; imports), else list parameters
    (``insert_rows``; the probe)."""
    if columnar:
        seen: set = set()
        unique = [item for item in batch if item[0]["measurement_id"] not in seen and not seen.add(item[0]["measurement_id"])]
        return insert_tables(con, arrow_tables(unique))
    existing = stored_ids(con, [r["measurement_id"] for r, _ in batch])
    fresh = []
    for record, category in batch:
        if record["measurement_id"] not in existing:
            existing.add(record["measurement_id"])
            fresh.append((record, category))
    if not fresh:
        return 0
    con.execute("BEGIN")
    try:
        for table, rows in iter_table_rows(fresh):
            insert_rows(con, table, rows)
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    return len(fresh)


def write_each(con: duckdb.DuckDBPyConnection, batch: list[tuple[dict[str, Any], str | None]],
               on_failure: Callable[[tuple[dict[str, Any], str | None], BaseException], None],
               columnar: bool = False) -> int:
    """``write_records`` for the batch; when it fails, each record alone, so a
    record that cannot be stored fails alone (``on_failure`` gets it). Returns
    how many records were stored."""
    return _alone_on_failure(batch, lambda part: write_records(con, part, columnar), on_failure)


@contextlib.contextmanager
def bulk_gc() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector off for a bulk import: parsing and
    flattening make millions of short-lived objects, and the collector kept
    walking the ones alive (a tenth to a fifth of an import's time). What
    exists already is frozen out of its sight; the caller calls the function
    it gets after each batch, which collects the young objects (the batch's
    cycles, if any), so memory stays bounded."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield lambda: gc.collect(1)
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def _bytes(size: str) -> float | None:
    """DuckDB's ``'18.3 GiB'``/``'512MB'`` as bytes (None when it is not one)."""
    number = size.strip().rstrip("BbIiKkMmGgTt ")
    try:
        return float(number) * _UNITS[size.strip()[len(number):].strip().upper()]
    except (ValueError, KeyError):
        return None


@contextlib.contextmanager
def memory_limit(con: duckdb.DuckDBPyConnection, limit: str) -> Iterator[None]:
    """DuckDB's memory limit at most ``limit`` for a while (a lower one set
    by the caller stays), then as it was."""
    current = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    mine, theirs = _bytes(limit), _bytes(current)
    lower = mine is not None and (theirs is None or mine < theirs)
    if lower:
        con.execute(f"SET memory_limit = '{limit}'")
    try:
        yield
    finally:
        if lower:
            try:
                con.execute(f"SET memory_limit = '{current}'")
            except Exception:  # the connection is gone: nothing to restore
                pass


def rescue_line(record: dict[str, Any], category: str | None, error: BaseException | str | None = None) -> str:
    """One line of a rescue file. ASCII JSON: escapes whatever text the
    database choked on."""
    entry: dict[str, Any] = {"category_code": category, "record": record}
    if error is not None:
        entry["error"] = error if isinstance(error, str) else _first_line(error)
    return json.dumps(entry, default=str) + "\n"


class Sink:
    """A single writer thread fed by a bounded queue.

    ``put`` blocks when the queue is full (back-pressure on the runner instead of
    unbounded memory). ``close`` flushes everything; records put before a crash
    of the caller are still written because the thread drains the queue.

    Outcome, for the run's status (probes/runner.py ``finish_run``):
    ``written`` records stored, ``not_stored`` records that were not (of which
    ``rescued`` are in the rescue file), and ``error`` when the database
    itself refused writes (then every later record goes to the rescue file and
    the runner stops measuring).
    """

    # Records failing one by one in a row (with none stored between them)
    # before the database, not the records, is taken to be the problem.
    GIVE_UP_AFTER = 8

    def __init__(self, con: duckdb.DuckDBPyConnection, batch_size: int = 100, queue_size: int = 200, flush_seconds: float = 1.0,
                 rescue_path: str | os.PathLike | None = None):
        self.con = con
        # Where records go when the database refuses them (disk full, out of
        # memory...): measured data is never dropped.
        self.rescue_path = Path(rescue_path) if rescue_path else None
        self.rescued = 0
        self.not_stored = 0
        self.last_failure: BaseException | None = None
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.written = 0
        self.error: BaseException | None = None
        self._failing = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._drain, name="vantage-sink", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any], category_code: str | None = None) -> None:
        """Queue a record; after a database error, records still queue and go
        to the rescue file (the runner stops starting new measurements)."""
        self._wait_put((record, category_code))

    async def aput(self, record: dict[str, Any], category_code: str | None = None) -> None:
        """``put`` for the event loop: waits for room in a thread when the
        queue is full, so measurements in flight are not frozen meanwhile."""
        if not self._offer((record, category_code)):
            import asyncio

            await asyncio.to_thread(self._wait_put, (record, category_code))

    def _offer(self, item: tuple[dict[str, Any], str | None]) -> bool:
        """Take ``item`` without blocking, or say no (then ``_wait_put``)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def _wait_put(self, item: tuple[dict[str, Any], str | None]) -> None:
        self._queue.put(item)

    @property
    def failed(self) -> bool:
        """The database refuses writes (not merely a record it could not store)."""
        return self.error is not None

    def call(self, fn, *args) -> None:
        """Run ``fn(con, *args)`` on the writer thread, in order with the records."""
        self._queue.put(("call", fn, args))

    def run_status(self, status: str) -> str:
        """The run's status given the runner's (finished, interrupted,
        timed_out...) and what happened to the data: ``store_failed`` when
        the database refused writes, ``partial`` for a run that measured
        everything but could not store some records (they are in the rescue
        file: ``import_rescue``)."""
        if self.error is not None:
            return "store_failed"
        if self.not_stored and status == "finished":
            return "partial"
        return status

    def _drain(self) -> None:
        batch: list = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            stop = item is _STOP
            call = isinstance(item, tuple) and len(item) == 3 and item[0] == "call"
            if item is not None and not stop and not call:
                batch.append(item)
            if batch and (stop or call or len(batch) >= self.batch_size or time.monotonic() >= deadline):
                self._flush(batch)
                batch = []
            if call:
                try:
                    item[1](self.con, *item[2])
                except Exception as exc:  # keep draining: measured data matters more
                    self.error = exc
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self.flush_seconds
            if stop:
                return

    def _flush(self, batch: list) -> None:
        if self.error is not None:
            for item in batch:
                self._not_stored(item, self.error)
            return
        try:
            stored = write_each(self.con, batch, self._lone_failure)
        except Exception as exc:  # a bug in the fallback itself: still lose nothing
            self.error = exc
            for item in batch:
                self._not_stored(item, exc)
            return
        self.written += stored
        if stored:
            self._failing = 0

    def _lone_failure(self, item: tuple[dict[str, Any], str | None], exc: BaseException) -> None:
        """A record that failed even alone: rescue it; and if the database
        itself is gone (closed, or failing record after record), stop."""
        self._not_stored(item, exc)
        self.last_failure = exc
        self._failing += 1
        if self.error is None and (self._failing >= self.GIVE_UP_AFTER or not self._alive()):
            self.error = exc

    def _alive(self) -> bool:
        try:
            self.con.execute("SELECT 1").fetchall()
            return True
        except Exception:
            return False

    def _not_stored(self, item: tuple[dict[str, Any], str | None], exc: BaseException) -> None:
        self.not_stored += 1
        if self.rescue_path is None:
            return
        record, category = item
        try:
            with open(self.rescue_path, "a", encoding="utf-8") as fh:
                fh.write(rescue_line(record, category, exc))
            self.rescued += 1
        except Exception:  # the last resort must not kill the writer thread
            pass

    def close(self) -> None:
        """Flush and stop. Raises StoreError when the database refused writes;
        records that failed alone are only counted (``not_stored``,
        ``rescued``): the run's status reports them."""
        self._queue.put(_STOP)
        self._thread.join()
        if self.error:
            where = f"; {self.rescued} measurements saved to {self.rescue_path}" if self.rescued else ""
            raise StoreError(f"writing to the database failed: {_first_line(self.error)}{where}")


_STOP = object()


def write_all(con: duckdb.DuckDBPyConnection, records: Iterable[tuple[dict[str, Any], str | None]], batch_size: int = 500) -> int:
    """Synchronous bulk write (imports, tests). Returns how many records were
    handed over (stored now or before)."""
    batch: list = []
    count = 0
    for item in records:
        batch.append(item)
        if len(batch) >= batch_size:
            write_records(con, batch)
            count += len(batch)
            batch = []
    if batch:
        write_records(con, batch)
        count += len(batch)
    return count


def import_rescue(con: duckdb.DuckDBPyConnection, path: str | os.PathLike, batch_size: int = 100) -> tuple[int, int]:
    """Re-import a rescue file (JSON lines ``{"category_code", "record"}``
    written by the Sink). Idempotent: records already stored are skipped, so
    importing a file twice, or after a partial import, is harmless. Returns
    ``(imported, skipped)``: skipped counts lines already stored, unreadable,
    or still refused by the database (those stay in the file, which is never
    modified). A run whose rescued records are all stored again becomes
    ``finished`` when it was ``partial``. Raises StoreError when the file
    cannot be read."""
    source = Path(path)
    imported = skipped = 0
    per_run: dict[str, int] = {}

    def refused(item, exc) -> None:
        nonlocal skipped
        skipped += 1

    def flush(batch: list) -> None:
        nonlocal imported, skipped
        ids = [r["measurement_id"] for r, _ in batch]
        before = stored_ids(con, ids)
        write_each(con, batch, refused)
        after = stored_ids(con, ids)
        seen: set = set()
        for record, _ in batch:
            mid = record["measurement_id"]
            if mid in seen or mid in before:
                skipped += 1
            elif mid in after:
                imported += 1
                run = record.get("run_id") or record.get("report_id")
                if isinstance(run, str):
                    per_run[run] = per_run.get(run, 0) + 1
            seen.add(mid)

    try:
        fh = open(source, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise StoreError(f"cannot read the rescue file {source}: {exc.strerror}") from None
    batch: list = []
    with fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                record = entry["record"]
                category = entry.get("category_code")
                if not isinstance(record, dict) or not isinstance(record.get("measurement_id"), str):
                    raise ValueError("no record")
            except (ValueError, KeyError, TypeError, AttributeError):
                skipped += 1
                continue
            batch.append((record, category if isinstance(category, str) else None))
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
    if batch:
        flush(batch)
    for run, count in per_run.items():
        con.execute("UPDATE runs SET rescued = greatest(coalesce(rescued, 0) - ?, 0) WHERE run_id = ?", [count, run])
        con.execute("UPDATE runs SET status = 'finished' WHERE run_id = ? AND status = 'partial' AND rescued = 0", [run])
    return imported, skipped


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
