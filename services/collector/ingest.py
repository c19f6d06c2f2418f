"""Ingestion: ready spool segments into the central DuckDB, apart from the
request path, in batches, through the one writer (probes.store).

One ingestor owns the database connection, in a child process of the
collector (``IngestProcess``: requests and ingestion each get a core). For each ready segment, in order:
read its lines, convert each measurement with probes.ooni_import's
``record_from_ooni`` (the collector stores OONI's envelope, Vantage's ``x_``
keys included, exactly as ``vantage import ooni`` would), flatten the batch
into Arrow tables (``probes.store.arrow_tables_each``) and write them with
``probes.store.insert_each`` (each batch one transaction; a measurement the
database refuses even alone goes to ``rejected.jsonl``), and only then delete
the segment. A crash anywhere in between leaves the segment in place; the
next start ingests it again and the store skips the measurements already
committed (ids are primary keys, and rows of a stored measurement are never
written twice): ingestion is idempotent.

When there is nothing to ingest for ``idle_close`` seconds the connection is
closed, so an analyst can open the database (`vantage analyze`) between
bursts; if the database is busy the spool simply waits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from probes import store
from probes.ooni_import import record_from_ooni

from .spool import REJECTED, Spool, fsync_dir

MEMORY_LIMIT = "256MB"
THREADS = 2


class Ingestor:
    def __init__(self, db_path: str | os.PathLike, spool: Spool, batch_size: int = 2000, idle_close: float = 5.0,
                 log=None, stop=None, on_commit=None, poll: float = 0.5):
        self.db_path = str(db_path)
        self.spool = spool
        self.batch_size = batch_size
        self.idle_close = idle_close
        self.log = log or (lambda message: None)
        self.ingested = 0       # new measurements committed
        self.duplicates = 0     # already stored (retries, re-sent files, re-ingested segments)
        self.torn = 0           # a segment's last line cut by a crash (not JSON), acknowledged to nobody
        self.rejected = 0       # refused by the database even alone, or a line that cannot be read (rejected.jsonl)
        self.segments = 0
        self.errors = 0
        self.busy = False
        self.last_error: str | None = None
        self._con = None
        self._stop = stop if stop is not None else threading.Event()
        self._on_commit = on_commit or (lambda ingestor: None)
        self._poll = poll
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vantage-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ingest everything ready, then stop (the caller rotated the spool's
        open segment first)."""
        self._stop.set()
        self.spool.ready.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            self.spool.ready.clear()
            segments = self.spool.ready_segments()
            if segments:
                try:
                    self.ingest(segments[:64])
                    idle_since = time.monotonic()
                except Exception as exc:  # the database is busy or failing: the spool keeps everything
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    self.log(f"ingestion paused: {self.last_error}")
                    self._on_commit(self)
                    self._close()
                    if stopping:
                        return
                    self._stop.wait(1.0)
                    continue
            if stopping and not self.spool.ready_segments():
                return
            if self._con is not None and time.monotonic() - idle_since >= self.idle_close:
                self._close()
            self.spool.ready.wait(self._poll)

    def _connection(self):
        if self._con is None:
            self._con = store.connect(self.db_path, memory_limit=MEMORY_LIMIT, threads=THREADS)
        return self._con

    def _close(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            except Exception:
                pass
            self._con = None

    def ingest(self, segments: list[Path]) -> None:
        """Ingest ``segments`` in order, in batches of ``batch_size`` that may
        span segments (small segments of a quiet hour still make big, cheap
        transactions); a segment is deleted once the batch holding its last
        line has committed."""
        con = self._connection()
        self.busy = True
        try:
            with store.bulk_gc() as collect:
                self._read(con, segments, collect)
        finally:
            self.busy = False

    def _read(self, con, segments: list[Path], collect) -> None:
        batch: list[tuple[dict[str, Any], str | None]] = []
        seen: set[str] = set()
        finished: list[Path] = []  # read to the end; deleted after the commit of the batch that ends them
        duplicates = 0

        def hand_over() -> None:
            nonlocal batch, seen, finished, duplicates
            refused: list = []
            tables, ids = store.arrow_tables_each(batch, lambda item, exc: refused.append((item, exc)))
            self._commit(con, _Flattened(batch, tables, ids, refused, finished, duplicates))
            batch, seen, finished, duplicates = [], set(), [], 0
            collect()

        for path in segments:
            with open(path, "rb") as fh:
                for line, last in _with_last(fh):
                    item = self._parse(line, last)
                    if item is None:
                        continue
                    if item[0]["measurement_id"] in seen:
                        duplicates += 1
                        continue
                    seen.add(item[0]["measurement_id"])
                    batch.append(item)
                    if len(batch) >= self.batch_size:
                        hand_over()
            finished.append(path)
        hand_over()

    def _commit(self, con, done: _Flattened) -> None:
        """One batch into the database, then its finished segments deleted."""
        if done.ids or done.refused:
            self._write(con, done)
        for path in done.finished:
            path.unlink()
        if done.finished:
            fsync_dir(done.finished[0].parent)
        self.duplicates += done.duplicates
        self.segments += len(done.finished)
        self._on_commit(self)

    def _parse(self, line: bytes, last: bool) -> tuple[dict[str, Any], str | None] | None:
        """The record of one spool line. Only the segment's last line can be
        torn (cut by a crash, acknowledged to nobody) and is skipped; any other
        line that cannot be read was acknowledged: it goes to rejected.jsonl."""
        if not line.strip():
            return None
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if last:
                self.torn += 1
                return None
            self._reject_line(line, f"not JSON: {exc}")
            return None
        try:
            record = record_from_ooni(entry["r"])
            record["measurement_id"] = entry["m"]
        except Exception as exc:
            self._reject_line(line, f"{type(exc).__name__}: {str(exc)[:200]}")
            return None
        return record, None

    def _reject_line(self, line: bytes, reason: str) -> None:
        """Keep an unreadable acknowledged line (raw, with the reason) in
        rejected.jsonl, fsync'd before its segment can be deleted. A failure
        here raises: ingestion pauses and the segment stays."""
        path = self.spool.dir / REJECTED
        new = not path.exists()
        entry = {"raw": line.rstrip(b"\n").decode("utf-8", "replace"), "reason": reason}
        with open(path, "ab") as fh:
            fh.write(orjson.dumps(entry) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(path.parent)
        self.rejected += 1

    def _write(self, con, done: _Flattened) -> None:
        refused = list(done.refused)  # records that could not be flattened
        items = {record["measurement_id"]: (record, category) for record, category in done.batch}
        stored = store.insert_each(con, done.tables, done.ids, lambda mid, exc: refused.append((items[mid], exc))) \
            if done.ids else 0
        if len(refused) > len(done.refused):
            con.execute("SELECT 1").fetchall()  # the database itself failing: raise, keep the segment
        self.ingested += stored
        self.duplicates += len(done.batch) - stored - len(refused)
        if refused:
            self._reject(refused)

    def _reject(self, refused: list) -> None:
        with open(self.spool.dir / REJECTED, "a", encoding="utf-8") as fh:
            for (record, category), exc in refused:
                fh.write(store.rescue_line(record, category, exc))
            fh.flush()
            os.fsync(fh.fileno())
        self.rejected += len(refused)


@dataclass
class _Flattened:
    """A batch read and flattened, ready to commit."""

    batch: list[tuple[dict[str, Any], str | None]]
    tables: dict[str, Any]          # probes.store.arrow_tables
    ids: list[str]                  # the measurements in ``tables``
    refused: list                   # (item, exception): records that could not be flattened
    finished: list[Path]            # segments whose last line is in this batch (or before)
    duplicates: int                 # lines skipped as already in the batch


def _with_last(lines):
    """``(line, is_last)`` for each line."""
    previous = None
    for line in lines:
        if previous is not None:
            yield previous, False
        previous = line
    if previous is not None:
        yield previous, True


# --- In a process of its own ------------------------------------------------------

_STATS = ("ingested", "duplicates", "torn", "rejected", "segments", "errors")


class _SpoolDir:
    """What the ingestor needs of the spool in another process: the folder
    (polled; the segments' names say which are ready)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.ready = threading.Event()

    def ready_segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.ready"))


def _die_with_parent() -> None:
    try:  # Linux: SIGKILL when the collector dies, however it dies (no orphan holding the database)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


ERROR_BYTES = 512  # the shared buffer holding the child's last error


def _process_main(db_path: str, spool_dir: str, batch_size: int, stats, stop, parent: int, error=None) -> None:
    _die_with_parent()
    if os.getppid() != parent:
        return
    # systemd and terminals signal the whole group: only the collector decides when ingestion stops.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def publish(ingestor: Ingestor) -> None:
        stats[:] = [float(getattr(ingestor, name)) for name in _STATS]
        if error is not None and ingestor.last_error is not None:
            error.value = ingestor.last_error.encode("utf-8", "replace")[:ERROR_BYTES - 1]

    def log(message: str) -> None:
        print(f"vantage collector: {message}", file=sys.stderr, flush=True)

    ingestor = Ingestor(db_path, _SpoolDir(spool_dir), batch_size, log=log, stop=stop, on_commit=publish, poll=0.2)
    for name, value in zip(_STATS, stats):  # a restarted ingestor carries on counting: metrics never go backwards
        setattr(ingestor, name, int(value))
    try:
        ingestor._loop()
    finally:
        ingestor._close()
        publish(ingestor)


class IngestProcess:
    """The Ingestor in a child process: the request path and ingestion each
    get a core (and a GIL) of their own, and the writer's memory is not the
    server's. Same counters, and the last error, read from shared memory;
    ``start`` again after the child died starts a new one that carries the
    counters (and the last error) on."""

    busy = False

    def __init__(self, db_path: str | os.PathLike, spool_dir: str | os.PathLike, batch_size: int = 2000):
        self.db_path = str(db_path)
        self.spool_dir = str(spool_dir)
        self.batch_size = batch_size
        self._proc = None
        self._ctx = multiprocessing.get_context("spawn")
        self._stats = self._ctx.Array("d", len(_STATS), lock=False)
        self._error = self._ctx.Array("c", ERROR_BYTES, lock=False)

    def start(self) -> None:
        """Start the child (again, after it died: the counters carry on)."""
        if self._proc is not None and not self._proc.is_alive() and self._proc.exitcode not in (0, None):
            died = f"the ingestor process died (exit code {self._proc.exitcode})"
            self._error.value = died.encode()[:ERROR_BYTES - 1]
        self._stop = self._ctx.Event()
        self._proc = self._ctx.Process(target=_process_main, name="vantage-ingest", daemon=True,
                                       args=(self.db_path, self.spool_dir, self.batch_size, self._stats, self._stop,
                                             os.getpid(), self._error))
        self._proc.start()

    @property
    def last_error(self) -> str | None:
        """The child's last error (``Type: message``), None while there was none."""
        raw = self._error.value
        return raw.decode("utf-8", "replace") if raw else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Ingest everything ready, then stop (the caller closed the spool first)."""
        if self._proc is None:
            return
        self._stop.set()
        self._proc.join()

    def __getattr__(self, name: str):
        if name in _STATS:
            return int(self.__dict__["_stats"][_STATS.index(name)])
        raise AttributeError(name)
