"""The only code that writes the DuckDB file.

DuckDB allows one writer, so all writes go through one ``Sink``: a bounded
queue drained by a single thread that inserts records in batches (via Arrow,
~50x faster than executemany). Memory stays flat however long the run: at most
``queue_size + batch_size`` records are held at once.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import duckdb

from core import paths
from core.errors import VantageError

from .flatten import TABLE_COLUMNS, iter_table_rows

MIGRATIONS = [(1, "initial schema", "schema.sql")]

# A probe on a Raspberry Pi only appends: a small buffer pool (DuckDB spills
# beyond it) and one thread took a 10,000-record write from +84 MB to +55 MB
# of RSS without slowing the run (bench/probe_bench.py).
PROBE_MEMORY_LIMIT = "32MB"
PROBE_THREADS = 1


class StoreError(VantageError):
    """A database problem the user can fix (bad path, locked file...): one line."""


def default_db_path() -> Path:
    return paths.default_db_path()


def connect(path: str | os.PathLike | None = None, read_only: bool = False, memory_limit: str | None = None,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open (and migrate) the database, or raise StoreError with a clear reason.

    ``memory_limit``/``threads``: DuckDB's defaults (80% of RAM, all cores) suit
    analysis; the probe passes PROBE_MEMORY_LIMIT/PROBE_THREADS."""
    target = Path(path) if path else default_db_path()
    if str(target) != ":memory:":
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory for the database {target}: {exc.strerror}") from None
        if read_only and not target.exists():
            raise StoreError(f"no database at {target} (run `vantage run` first, or pass --db)")
        if not read_only and target.exists() and not os.access(target, os.W_OK):
            raise StoreError(f"the database {target} is not writable")
        if not read_only and not target.exists() and not os.access(target.parent, os.W_OK):
            raise StoreError(f"cannot write the database in {target.parent}: permission denied")
    try:
        con = duckdb.connect(str(target), read_only=read_only)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot open the database {target}: {first}") from None
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if not read_only:
        migrate(con)
    return con


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP DEFAULT current_timestamp)")
    done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
    for version, name, filename in MIGRATIONS:
        if version in done:
            continue
        sql = resources.files("probes").joinpath(filename).read_text()
        con.execute("BEGIN")
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
        con.execute("COMMIT")


_CHUNK_ROWS = 500  # rows per INSERT: one statement, bounded parameter count
_CHUNK_BYTES = 2 * 1024 * 1024  # ...and bounded size: bodies can be 64 KiB each


def _valid_text(value: Any) -> Any:
    """DuckDB refuses strings that are not valid UTF-8, and undecodable bytes
    from the network (headers, bodies) reach us as lone surrogates: replace
    them rather than lose the record."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple]) -> None:
    """Multi-row VALUES inserts: ~20x faster than executemany in DuckDB, and
    no pyarrow (≈40 MB of RSS a Raspberry Pi can keep)."""
    columns = TABLE_COLUMNS[table]
    # INSERT OR IGNORE: re-importing the same measurement is harmless.
    verb = "INSERT OR IGNORE" if table == "measurements" else "INSERT"
    row_marks = "(" + ", ".join("?" * len(columns)) + ")"
    def flush(chunk: list[tuple]) -> None:
        sql = f"{verb} INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row_marks] * len(chunk))
        con.execute(sql, [_valid_text(value) for row in chunk for value in row])

    chunk: list[tuple] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += sum(len(v) for v in row if isinstance(v, str))
        if len(chunk) >= _CHUNK_ROWS or size >= _CHUNK_BYTES:
            flush(chunk)
            chunk, size = [], 0
    if chunk:
        flush(chunk)


def write_records(con: duckdb.DuckDBPyConnection, batch: list[tuple[dict[str, Any], str | None]]) -> None:
    """Insert a batch of records atomically; records already stored are skipped."""
    ids = [r["measurement_id"] for r, _ in batch]
    placeholders = ",".join("?" * len(ids))
    existing = {row[0] for row in con.execute(f"SELECT measurement_id FROM measurements WHERE measurement_id IN ({placeholders})", ids).fetchall()}
    fresh = []
    for record, category in batch:
        if record["measurement_id"] not in existing:
            existing.add(record["measurement_id"])
            fresh.append((record, category))
    if not fresh:
        return
    con.execute("BEGIN")
    try:
        for table, rows in iter_table_rows(fresh):
            insert_rows(con, table, rows)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise


class Sink:
    """A single writer thread fed by a bounded queue.

    ``put`` blocks when the queue is full (back-pressure on the runner instead of
    unbounded memory). ``close`` flushes everything; records put before a crash
    of the caller are still written because the thread drains the queue.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, batch_size: int = 100, queue_size: int = 200, flush_seconds: float = 1.0,
                 rescue_path: str | os.PathLike | None = None):
        self.con = con
        # Where records go when the database refuses them (disk full, out of
        # memory...): measured data is never dropped.
        self.rescue_path = Path(rescue_path) if rescue_path else None
        self.rescued = 0
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.written = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._drain, name="vantage-sink", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any], category_code: str | None = None) -> None:
        """Queue a record; after a database error, records still queue and go
        to the rescue file (the runner stops starting new measurements)."""
        self._queue.put((record, category_code))

    async def aput(self, record: dict[str, Any], category_code: str | None = None) -> None:
        """``put`` for the event loop: waits for room in a thread when the
        queue is full, so measurements in flight are not frozen meanwhile."""
        try:
            self._queue.put_nowait((record, category_code))
        except queue.Full:
            import asyncio

            await asyncio.to_thread(self._queue.put, (record, category_code))

    @property
    def failed(self) -> bool:
        return self.error is not None

    def call(self, fn, *args) -> None:
        """Run ``fn(con, *args)`` on the writer thread, in order with the records."""
        self._queue.put(("call", fn, args))

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
        try:
            if self.error is None:
                write_records(self.con, batch)
                self.written += len(batch)
                return
        except Exception as exc:
            self.error = exc
        self._rescue(batch)

    def _rescue(self, batch: list) -> None:
        if self.rescue_path is None:
            return
        try:
            with open(self.rescue_path, "a", encoding="utf-8") as fh:
                for record, category in batch:
                    # ASCII JSON: escapes whatever text the database choked on.
                    fh.write(json.dumps({"category_code": category, "record": record}) + "\n")
            self.rescued += len(batch)
        except Exception:  # the last resort must not kill the writer thread
            pass

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if self.error:
            first = (str(self.error).strip().splitlines() or [type(self.error).__name__])[0]
            where = f"; {self.rescued} measurements saved to {self.rescue_path}" if self.rescued else ""
            raise StoreError(f"writing to the database failed: {first}{where}")


_STOP = object()


def write_all(con: duckdb.DuckDBPyConnection, records: Iterable[tuple[dict[str, Any], str | None]], batch_size: int = 500) -> int:
    """Synchronous bulk write (imports, tests)."""
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


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
