"""The append-only spool: what "acknowledged" rests on.

A measurement is answered 200 only after its line is written to the open
segment and ``fsync``'d (the file; the directory when the segment was
created or renamed). Concurrent requests share one ``fsync`` (group commit):
each waits for the first flush that covers its line, so throughput does not
stop at the disk's fsync rate.

Layout of the spool directory:

- ``seg-<seq>.open``: the segment being appended to, one JSON line per
  measurement ``{"m": measurement id, "r": the measurement as stored}``.
- ``seg-<seq>.ready``: a closed segment (renamed from ``.open`` when it
  reached ``segment_bytes`` or ``segment_seconds``), waiting for the ingestor
  (ingest.py), which deletes it only after the DuckDB transaction holding
  its measurements committed.
- ``reports.jsonl``: the report registry, append-only: ``open`` and
  ``close`` events, each fsync'd before the client hears about it. It holds
  the SHA-256 of each report id, never the id itself.
- ``rejected.jsonl``: measurements the database refused even alone
  (probes.store's rescue format), kept rather than lost.

After a crash, ``.open`` segments become ``.ready`` (a torn last line is a
line nobody was told was stored; the ingestor skips it) and the registry is
replayed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from core.download import fsync_dir  # shared with the probe's spool

REPORTS = "reports.jsonl"
REJECTED = "rejected.jsonl"
# Reports older than this are forgotten at the next start (an upload to one
# then gets 404, and the client opens a new report: ids are content-derived,
# so nothing is stored twice).
REPORT_TTL_SECONDS = 7 * 86400


@dataclass
class Report:
    public_id: str
    test_name: str
    opened_at: float
    closed: bool = False


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _write_all(fd: int, data: bytes | list[bytes]) -> None:
    """Write ``data`` (bytes, or a list of pieces: one writev, no joined
    copy of a group commit's megabytes) to the end of ``fd``."""
    pieces = [memoryview(piece) for piece in ([data] if isinstance(data, (bytes, bytearray)) else data) if piece]
    first = 0
    while first < len(pieces):
        written = os.writev(fd, pieces[first:first + _IOV_MAX])
        while written:  # skip what was written; a piece written in part goes again from where it stopped
            size = len(pieces[first])
            if written >= size:
                written -= size
                first += 1
            else:
                pieces[first] = pieces[first][written:]
                written = 0


class Spool:
    def __init__(self, directory: str | os.PathLike, segment_bytes: int = 8 << 20, segment_seconds: float = 1.0):
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.reports: dict[str, Report] = {}
        self.ready = threading.Event()  # set when a segment becomes ready (the ingestor waits on it)
        self.appended = 0               # measurement lines made durable
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.recovered = 0              # .open segments found at start
        self._seq = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened = 0.0
        self._reports_fd: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vantage-spool")
        self._pending: list[tuple[bytes | list[bytes], bytes, int, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task | None = None
        self._closing = False

    # --- start and stop ----------------------------------------------------------

    def open(self) -> None:
        """Recover what a crash left (open segments become ready), replay and
        compact the report registry. Synchronous: before serving."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.dir.glob("seg-*.open")):
            os.replace(path, path.with_suffix(".ready"))
            self.recovered += 1
        for path in self.dir.glob("seg-*"):
            try:
                self._seq = max(self._seq, int(path.name[4:].split(".")[0]))
            except ValueError:
                continue
        self._load_reports()
        fsync_dir(self.dir)
        if self.ready_segments():
            self.ready.set()

    def _load_reports(self) -> None:
        path = self.dir / REPORTS
        if path.exists():
            with open(path, "rb") as fh:
                for line in fh:
                    try:
                        event = orjson.loads(line)
                        key = event["key"]
                        if event["op"] == "open":
                            self.reports[key] = Report(event["public"], event["test_name"], float(event["at"]))
                        elif event["op"] == "close" and key in self.reports:
                            self.reports[key].closed = True
                    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # a torn last line: an open nobody was answered for
        cutoff = time.time() - REPORT_TTL_SECONDS
        self.reports = {k: r for k, r in self.reports.items() if r.opened_at >= cutoff}
        temp = path.with_suffix(".tmp")
        with open(temp, "wb") as fh:
            for key, r in self.reports.items():
                fh.write(_report_line("open", key, r))
                if r.closed:
                    fh.write(orjson.dumps({"op": "close", "key": key}) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
        self._reports_fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def start(self) -> None:
        """Start the group-commit flusher (inside the event loop)."""
        self._wake = asyncio.Event()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        """Make everything pending durable, close the open segment (it
        becomes ready) and stop."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._flusher is not None:
            await self._flusher
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._rotate)
        if self._reports_fd is not None:
            os.close(self._reports_fd)
            self._reports_fd = None
        self._executor.shutdown(wait=True)

    # --- appending ---------------------------------------------------------------

    async def append(self, lines: bytes | list[bytes], count: int = 1, report_event: bytes = b"") -> None:
        """Return once ``lines`` (``count`` measurements: bytes, or a list of
        lines) and ``report_event`` are on disk; raises OSError when they
        could not be made durable."""
        if self._closing:
            raise OSError("the spool is closing")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((lines, report_event, count, future))
        self._wake.set()
        await future

    async def open_report(self, key: str, report: Report) -> None:
        await self.append(b"", 0, _report_line("open", key, report))
        self.reports[key] = report

    async def close_report(self, key: str) -> None:
        await self.append(b"", 0, orjson.dumps({"op": "close", "key": key}) + b"\n")
        self.reports[key].closed = True

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.segment_seconds / 2)
            except TimeoutError:
                pass
            self._wake.clear()
            batch, self._pending = self._pending, []
            if batch:
                data: list[bytes] = []
                for lines, *_ in batch:
                    if isinstance(lines, list):
                        data += lines
                    elif lines:
                        data.append(lines)
                events = b"".join(b[1] for b in batch)
                try:
                    await loop.run_in_executor(self._executor, self._commit, data, events)
                except OSError as exc:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(OSError(exc.errno, exc.strerror))
                else:
                    self.appended += sum(b[2] for b in batch)
                    for *_, future in batch:
                        if not future.done():
                            future.set_result(None)
            elif self._fd is not None and time.monotonic() - self._opened >= self.segment_seconds:
                await loop.run_in_executor(self._executor, self._rotate)
            if self._closing and not self._pending:
                return

    # --- on the spool thread -------------------------------------------------------

    def _commit(self, data: list[bytes], events: bytes) -> None:
        started = time.monotonic()
        if events:
            _write_all(self._reports_fd, events)
            os.fsync(self._reports_fd)
        if data:
            if self._fd is None:
                self._new_segment()
            good = self._size
            try:
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError:
                # Nobody is told these lines are stored: cut them off, and
                # start the next write in a fresh segment.
                try:
                    os.ftruncate(self._fd, good)
                except OSError:
                    pass
                self._rotate()
                raise
            self._size += sum(map(len, data))
            if self._size >= self.segment_bytes or time.monotonic() - self._opened >= self.segment_seconds:
                self._rotate()
        self.fsyncs += 1
        self.fsync_seconds += time.monotonic() - started

    def _new_segment(self) -> None:
        self._seq += 1
        self._path = self.dir / f"seg-{self._seq:012d}.open"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fsync_dir(self.dir)
        self._size = 0
        self._opened = time.monotonic()

    def _rotate(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self._size == 0:
            self._path.unlink(missing_ok=True)
        else:
            os.replace(self._path, self._path.with_suffix(".ready"))
            self.ready.set()
        fsync_dir(self.dir)

    # --- for the ingestor and the metrics ---------------------------------------------

    def ready_segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.ready"))

    def pending_bytes(self) -> int:
        total = 0
        for path in self.dir.glob("seg-*"):
            try:
                total += path.stat().st_size
            except OSError:
                continue
        return total


def _report_line(op: str, key: str, report: Report) -> bytes:
    return orjson.dumps({"op": op, "key": key, "public": report.public_id, "test_name": report.test_name,
                         "at": report.opened_at}) + b"\n"
