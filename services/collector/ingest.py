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

In the collector the ingestor works in two processes (``Ingestor._piped_loop``):
a reader process reads, converts and flattens the next batch
(``read_batches``) while the ingestor writes the previous one; only Arrow
tables and the lines' places travel between them.

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
from typing import Any, Iterator

import orjson

from probes import store
from probes.ooni_import import record_from_ooni

from .spool import REJECTED, Spool, fsync_dir

MEMORY_LIMIT = "256MB"
THREADS = 2


class Ingestor:
    def __init__(self, db_path: str | os.PathLike, spool: Spool, batch_size: int = 2000, idle_close: float = 5.0,
                 log=None, stop=None, on_commit=None, poll: float = 0.5, reader: bool = False):
        self.db_path = str(db_path)
        self.reader = reader    # read and flatten in a reader process while this one writes (_piped_loop)
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
        if self.reader:
            return self._piped_loop()
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
                    self._failed(exc)
                    if stopping:
                        return
                    self._stop.wait(1.0)
                    continue
            if stopping and not self.spool.ready_segments():
                return
            if self._con is not None and time.monotonic() - idle_since >= self.idle_close:
                self._close()
            self.spool.ready.wait(self._poll)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.log(f"ingestion paused: {self.last_error}")
        self._on_commit(self)
        self._close()

    def _piped_loop(self) -> None:
        """Ingestion in two processes: a reader process (``_reader_main``)
        reads, converts and flattens the ready segments into Arrow tables
        while this one writes the previous batch (DuckDB). A batch that fails
        to commit (the database busy or failing) is kept and committed again
        a second later, not read again; a reader that died or could not read
        the spool is started again and reads what is still there (the store
        skips what was committed)."""
        idle_since = time.monotonic()
        reader: _Reader | None = None
        pending: _Flattened | None = None
        with store.bulk_gc() as collect:
            try:
                while True:
                    stopping = self._stop.is_set()
                    try:
                        if pending is None:
                            if reader is None:
                                reader = _Reader(self.spool.dir, self.batch_size)
                            pending = reader.get(self._poll)
                    except Exception as exc:  # the reader died or could not read: start it again
                        self._failed(exc)
                        if reader is not None:
                            reader.stop()
                        reader = None
                        if stopping:
                            return
                        self._stop.wait(1.0)
                        continue
                    if pending is not None:
                        self.busy = True
                        try:
                            self._commit(self._connection(), pending)
                        except Exception as exc:  # the database is busy or failing: the spool keeps everything
                            self._failed(exc)
                            if stopping:
                                return
                            self._stop.wait(1.0)
                            continue
                        finally:
                            self.busy = False
                        pending = None
                        collect()
                        idle_since = time.monotonic()
                        continue
                    if stopping and not self.spool.ready_segments():
                        return
                    if self._con is not None and time.monotonic() - idle_since >= self.idle_close:
                        self._close()
            finally:
                if reader is not None:
                    reader.stop()

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
                for done in read_batches(segments, self.batch_size):
                    self._commit(con, done)
                    collect()
        finally:
            self.busy = False

    def _commit(self, con, done: _Flattened) -> None:
        """One batch into the database, what it refused (and the lines that
        could not be read) kept in rejected.jsonl, then its finished segments
        deleted."""
        rescue = list(done.rescue)  # records that could not be flattened
        stored = 0
        if done.ids:
            refused: list = []
            stored = store.insert_each(con, done.tables, done.ids, lambda mid, exc: refused.append((mid, exc)))
            if refused:
                con.execute("SELECT 1").fetchall()  # the database itself failing: raise, keep the segment
                lines = _lines_at(done.where, {mid for mid, _ in refused})
                for mid, exc in refused:
                    record, category = _record(lines[mid])
                    rescue.append(store.rescue_line(record, category, exc))
            self.duplicates += len(done.ids) - stored - len(refused)
        if rescue or done.bad_lines:
            self._keep(rescue, done.bad_lines)
        self.ingested += stored
        self.torn += done.torn
        for path in done.finished:
            Path(path).unlink(missing_ok=True)  # missing: a batch of a reader that was restarted, committed twice
        if done.finished:
            fsync_dir(Path(done.finished[0]).parent)
        self.duplicates += done.duplicates
        self.segments += len(done.finished)
        self._on_commit(self)

    def _keep(self, rescue: list[str], bad_lines: list[bytes]) -> None:
        """Measurements the database refused (the rescue format) and
        acknowledged lines that cannot be read (``{"raw", "reason"}``) into
        rejected.jsonl, fsync'd before their segment can be deleted. A failure
        here raises: ingestion pauses and the segment stays."""
        path = self.spool.dir / REJECTED
        new = not path.exists()
        with open(path, "ab") as fh:
            for line in rescue:
                fh.write(line.encode("utf-8"))
            for line in bad_lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(path.parent)
        self.rejected += len(rescue) + len(bad_lines)


@dataclass
class _Flattened:
    """A batch read and flattened, ready to commit (what the reader process
    hands the writer: no record dicts, which would cost a pickling each)."""

    tables: dict[str, Any]          # probes.store.arrow_tables
    ids: list[str]                  # the measurements in ``tables``
    where: dict[str, tuple[str, int]]  # id -> (segment, offset) of its line: a measurement the database refuses
                                       # is read again from there for rejected.jsonl (its segment is still there)
    rescue: list[str]               # rescue lines of records that could not be flattened
    bad_lines: list[bytes]          # rejected.jsonl entries of lines that cannot be read
    torn: int                       # a segment's torn last line (acknowledged to nobody)
    finished: list[str]             # segments whose last line is in this batch (or before)
    duplicates: int                 # lines skipped as already in the batch


def _record(line: bytes) -> tuple[dict[str, Any], str | None]:
    """The record of one spool line ``{"m": id, "r": the measurement as stored}``."""
    entry = orjson.loads(line)
    record = record_from_ooni(entry["r"])
    record["measurement_id"] = entry["m"]
    return record, None


def _lines_at(where: dict[str, tuple[str, int]], ids: set[str]) -> dict[str, bytes]:
    """The spool lines of ``ids``, read again from their segments."""
    found = {}
    for mid in ids:
        path, offset = where[mid]
        with open(path, "rb") as fh:
            fh.seek(offset)
            found[mid] = fh.readline()
    return found


def _bad_line(line: bytes, reason: str) -> bytes:
    return orjson.dumps({"raw": line.rstrip(b"\n").decode("utf-8", "replace"), "reason": reason}) + b"\n"


def read_batches(segments: list[Path], batch_size: int) -> Iterator[_Flattened]:
    """The measurements of ``segments``, in order, flattened in batches of
    at most ``batch_size`` that may span segments. Only a segment's last line
    can be torn (cut by a crash, acknowledged to nobody) and is skipped; any
    other line that cannot be read was acknowledged: it is kept (``bad_lines``)."""
    batch: list[tuple[dict[str, Any], str | None]] = []
    where: dict[str, tuple[str, int]] = {}
    bad: list[bytes] = []
    finished: list[str] = []
    torn = duplicates = 0

    def hand_over() -> _Flattened:
        nonlocal batch, where, bad, finished, torn, duplicates
        rescue: list[str] = []
        tables, ids = store.arrow_tables_each(batch, lambda item, exc: rescue.append(store.rescue_line(*item, exc)))
        done = _Flattened(tables, ids, where, rescue, bad, torn, finished, duplicates)
        batch, where, bad, finished, torn, duplicates = [], {}, [], [], 0, 0
        return done

    for path in segments:
        name = str(path)
        offset = 0
        with open(path, "rb") as fh:
            for line, last in _with_last(fh):
                at, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    item = _record(line)
                except orjson.JSONDecodeError as exc:
                    if last:
                        torn += 1
                    else:
                        bad.append(_bad_line(line, f"not JSON: {exc}"))
                    continue
                except Exception as exc:
                    bad.append(_bad_line(line, f"{type(exc).__name__}: {str(exc)[:200]}"))
                    continue
                mid = item[0]["measurement_id"]
                if mid in where:
                    duplicates += 1
                    continue
                where[mid] = (name, at)
                batch.append(item)
                if len(batch) >= batch_size:
                    yield hand_over()
        finished.append(name)
    yield hand_over()


def _with_last(lines):
    """``(line, is_last)`` for each line."""
    previous = None
    for line in lines:
        if previous is not None:
            yield previous, False
        previous = line
    if previous is not None:
        yield previous, True


# --- The reader process ------------------------------------------------------------

READER_QUEUE = 2  # batches read ahead of the writer: bounds the reader's memory
READER_POLL = 0.1  # seconds between looks at the spool folder when nothing is ready


class IngestReaderError(Exception):
    """The reader process died or could not read the spool."""


def _reader_main(spool_dir: str, batch_size: int, out, parent: int) -> None:
    """Read, convert and flatten ready segments (``read_batches``) and hand
    the batches to the writer through ``out`` (bounded: this process waits
    when it is ahead). A segment handed over is not read again while it
    exists (the writer deletes it once committed)."""
    _die_with_parent()
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    directory = Path(spool_dir)
    handed: set[str] = set()
    try:
        with store.bulk_gc() as collect:
            while True:
                ready = sorted(directory.glob("seg-*.ready"))
                handed &= {str(path) for path in ready}
                todo = [path for path in ready if str(path) not in handed][:64]
                if not todo:
                    time.sleep(READER_POLL)
                    continue
                for done in read_batches(todo, batch_size):
                    out.put(("batch", done))
                    collect()
                handed.update(str(path) for path in todo)
    except BaseException as exc:
        out.put(("error", f"{type(exc).__name__}: {str(exc)[:200]}"))


class _Reader:
    """The reader process and the queue it fills, seen from the writer."""

    def __init__(self, spool_dir: str | os.PathLike, batch_size: int):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding DuckDB's threads
        self.queue = ctx.Queue(maxsize=READER_QUEUE)
        self.proc = ctx.Process(target=_reader_main, name="vantage-ingest-reader", daemon=True,
                                args=(str(spool_dir), batch_size, self.queue, os.getpid()))
        # The ingestor is itself a daemonic child (it dies with the collector); multiprocessing refuses
        # children to those, for fear of orphans: the reader dies with the ingestor (PR_SET_PDEATHSIG).
        me = multiprocessing.current_process()
        daemon = me._config.pop("daemon", None)
        try:
            self.proc.start()
        finally:
            if daemon is not None:
                me._config["daemon"] = daemon

    def get(self, timeout: float) -> _Flattened | None:
        """The next batch, None when none came within ``timeout``."""
        import queue

        try:
            kind, value = self.queue.get(timeout=timeout)
        except queue.Empty:
            if not self.proc.is_alive():
                raise IngestReaderError(f"the reader process died (exit code {self.proc.exitcode})") from None
            return None
        if kind == "error":
            raise IngestReaderError(f"reading the spool failed: {value}")
        return value

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()  # it holds nothing: it only reads the spool
        self.proc.join(5)
        self.queue.close()
        self.queue.cancel_join_thread()


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


def _process_main(db_path: str, spool_dir: str, batch_size: int, stats, stop, parent: int, error=None,
                  reader: bool = True) -> None:
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

    ingestor = Ingestor(db_path, _SpoolDir(spool_dir), batch_size, log=log, stop=stop, on_commit=publish, poll=0.2,
                        reader=reader)
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

    def __init__(self, db_path: str | os.PathLike, spool_dir: str | os.PathLike, batch_size: int = 2000,
                 reader: bool = True):
        self.db_path = str(db_path)
        self.spool_dir = str(spool_dir)
        self.batch_size = batch_size
        self.reader = reader  # the child reads and flattens in a reader process of its own (Ingestor._piped_loop)
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
                                             os.getpid(), self._error, self.reader))
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
