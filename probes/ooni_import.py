"""Import OONI measurements: files as OONI publishes them, into our tables.

``record_from_ooni`` converts one OONI Web Connectivity measurement into a
Vantage record. Vantage records already use OONI's field names, so this is
mostly identity. What differs, and why:

* ``engine: getaddrinfo`` is what Vantage calls ``system``.
* OONI keeps late DNS responses apart (``x_dns_duplicate_responses``); Vantage
  keeps them in ``queries`` with ``x_response_index >= 1`` on the same
  transaction.
* OONI's requests carry the endpoint in ``address``; Vantage in ``x_address``.
  Their order (last hop first) is left alone: the flattener numbers hops from
  the end when ``x_redirect_index`` is absent.
* OONI has no measurement id of ours: its ``measurement_uid`` is used, else
  ``x_measurement_id`` (what ``vantage export ooni`` writes), else one is
  derived from the report id and input (and, when the report id is empty,
  from the measurement's content, so distinct measurements never collide).
* OONI's own verdict (``test_keys.blocking``, ``accessible``) stays in the
  record; the flattener stores it in ``measurements.ooni_blocking`` and
  ``ooni_accessible``.

``import_ooni`` reads files and directories (``.json``, ``.jsonl``,
``.jsonl.gz``, ``.json.gz``, ooniprobe's ``.jsonc``; directories recursively,
as OONI's buckets lay them out: ``raw/YYYYMMDD/HH/CC/webconnectivity/*.jsonl.gz``)
and stores every Web Connectivity measurement through ``probes.store``. Other
test names are counted and skipped. A line that is not JSON, a record the
converter or the database refuses, a truncated ``.gz``: reported with file
and line, skipped, and nothing else is lost. Importing a file twice adds
nothing (measurement ids are stable; the store skips stored ones).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.errors import VantageError

from . import store

try:  # orjson parses OONI's lines ~3x faster; json is the fallback
    import orjson

    _loads: Callable[[bytes | str], Any] = orjson.loads
    _JSONError: tuple[type[BaseException], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None
    _loads = json.loads
    _JSONError = (ValueError,)

# The tests we import (OONI's test_name); everything else is counted, skipped.
IMPORTED_TESTS = frozenset({"web_connectivity"})
# File names a directory walk picks up (explicit paths are read whatever their name).
SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".jsonc")
# Bad records kept with their file and line in the summary (all are counted).
MAX_ERRORS_LISTED = 1000


class OoniImportError(VantageError):
    """A path that cannot be imported at all (missing, unreadable): one line."""


# --- One measurement ---------------------------------------------------------


def _measurement_id(ooni: dict[str, Any]) -> str:
    report = ooni.get("report_id") or ""
    key = f"{report}\0{ooni.get('input') or ''}\0{ooni.get('measurement_start_time') or ''}"
    if not report:
        key += "\0" + json.dumps(ooni, sort_keys=True, ensure_ascii=False, default=str)
    return "ooni-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _query(q: Any, response_index: int) -> Any:
    if not isinstance(q, dict):
        return q  # the flattener skips what is not an object
    if q.get("engine") == "getaddrinfo" or "x_response_index" not in q:
        q = dict(q)
        if q.get("engine") == "getaddrinfo":
            q["engine"] = "system"
        q.setdefault("x_response_index", response_index)
    return q


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def record_from_ooni(ooni: dict[str, Any]) -> dict[str, Any]:
    """A record for probes.store; the input dict is not modified (only what
    changes is copied: no deep copy of the whole measurement)."""
    record = dict(ooni)
    keys = ooni.get("test_keys")
    keys = dict(keys) if isinstance(keys, dict) else {}
    record["test_keys"] = keys
    uid = ooni.get("measurement_uid") or ooni.get("x_measurement_id")
    record["measurement_id"] = uid if isinstance(uid, str) and uid else _measurement_id(ooni)
    if not record.get("run_id"):
        record["run_id"] = ooni.get("report_id") or None
    queries = [_query(q, 0) for q in _list(keys.get("queries"))]
    queries += [_query(q, 1) for q in _list(keys.get("x_dns_duplicate_responses"))]
    keys["queries"] = queries
    requests = keys.get("requests")
    if isinstance(requests, list):
        keys["requests"] = [r | {"x_address": r["address"]}
                            if isinstance(r, dict) and "x_address" not in r and r.get("address") else r
                            for r in requests]
    # OONI measurements say nothing about the probe's own connectivity.
    keys.setdefault("x_probe_network_ok", None)
    return record


def wrap_test_keys(doc: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
    """ooniprobe's test fixtures sometimes hold the test keys alone: the
    envelope is rebuilt from what they say (the input is the first request's
    URL; OONI lists the last hop first)."""
    requests = [r.get("request") for r in _list(doc.get("requests")) if isinstance(r, dict)]
    urls = [r.get("url") for r in requests if isinstance(r, dict)]
    return {"test_name": "web_connectivity", "measurement_uid": uid, "input": urls[-1] if urls else None,
            "test_keys": doc}


# --- Reading files -----------------------------------------------------------


@dataclass
class BadRecord:
    file: str
    line: int
    error: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.error}"


@dataclass
class ImportSummary:
    """What an import did. ``partial``: some records (or files) could not be
    read or stored; they are listed in ``errors`` with file and line."""

    files: int = 0
    records: int = 0                                        # JSON documents read
    imported: int = 0                                       # new measurements stored
    duplicates: int = 0                                     # already stored (or twice in the input)
    skipped: dict[str, int] = field(default_factory=dict)   # other test names: count
    not_measurements: int = 0                               # JSON objects without test keys (listings, analyses)
    versions: dict[str, int] = field(default_factory=dict)  # web_connectivity versions imported or found again
    bad: int = 0                                            # bad records (all counted; the first are listed)
    errors: list[BadRecord] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.bad > 0

    def add_error(self, file: str, line: int, error: str) -> None:
        self.bad += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(BadRecord(file, line, error))

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "records": self.records, "imported": self.imported,
                "duplicates": self.duplicates, "skipped": dict(sorted(self.skipped.items())),
                "not_measurements": self.not_measurements, "versions": dict(sorted(self.versions.items())),
                "bad": self.bad, "partial": self.partial,
                "errors": [{"file": e.file, "line": e.line, "error": e.error} for e in self.errors]}


def iter_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files to read: explicit files as given, directories walked
    (sorted) for OONI's file names. A missing path is an error up front."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [Path(root) / n for n in sorted(names) if n.endswith(SUFFIXES)]
        elif path.is_file():
            found.append(path)
        else:
            raise OoniImportError(f"no such file or directory: {path}")
    return found


class _Counting(io.RawIOBase):
    """A file wrapper that counts the bytes read (compressed bytes, for the progress bar)."""

    def __init__(self, raw, on_read: Callable[[int], None] | None):
        self._raw = raw
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n and self._on_read:
            self._on_read(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


_LineItem = tuple[int, Any]  # (line, JSON text not parsed yet (bytes), a parsed value, or an Exception)


def _lines(lines: Iterable[bytes], start: int = 1) -> Iterator[_LineItem]:
    """The non-blank lines, as they are: parsing is ``parse_item``'s (in
    whichever process flattens them)."""
    for number, line in enumerate(lines, start):
        if line.strip():
            yield number, line


def parse_item(item: Any) -> Any:
    """A line's JSON text parsed (or the ValueError it raised); what is not
    text (parsed already, or an Exception) is returned as it is."""
    if not isinstance(item, bytes):
        return item
    try:
        return _loads(item)
    except _JSONError as exc:
        return ValueError(f"not JSON: {_short(exc)}")


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def iter_items(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[_LineItem]:
    """(line, item) for one file, JSON lines left unparsed (``parse_item``).

    ``.gz``: JSON lines; a truncated or corrupt stream yields one error at
    the line where it broke, after every line before it. Other files: one
    JSON document (an object, or a list of them, or ooniprobe's ``.jsonc`` with
    ``//`` comment lines), parsed, else JSON lines."""
    raw = _Counting(open(path, "rb", buffering=0), on_read)
    if path.name.endswith(".gz"):
        # GzipFile's own line reader, not a big buffer over it: a read that
        # fills a large buffer loses what it decompressed when the stream breaks.
        fh = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 16), mode="rb")
        number = 0
        try:
            for number, item in _lines(fh):
                yield number, item
        except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
            yield number + 1, ValueError(f"truncated or corrupt gzip stream: {_short(exc)}")
        finally:
            fh.close()
        return
    with io.BufferedReader(raw, 1 << 20) as fh:
        data = fh.read()
    if path.suffix == ".jsonl":
        yield from _lines(data.splitlines())
        return
    text = data
    uid = None
    if data.lstrip().startswith(b"//"):  # .jsonc: comment lines, the measurement's address in one of them
        lines = data.splitlines()
        comments = [ln.decode("utf-8", "replace") for ln in lines if ln.lstrip().startswith(b"//")]
        for comment in comments:
            after = comment.split("explorer.ooni.org/m/", 1)[1].split() if "explorer.ooni.org/m/" in comment else []
            if after:
                uid = after[0]
        text = b"\n".join(b"" if ln.lstrip().startswith(b"//") else ln for ln in lines)
    try:
        doc = _loads(text)
    except _JSONError:
        yield from _lines(text.splitlines())  # JSON lines in a .json file
        return
    if isinstance(doc, list):
        for position, item in enumerate(doc, 1):
            yield position, item
    else:
        if isinstance(doc, dict) and "test_keys" not in doc and "queries" in doc and "requests" in doc:
            doc = wrap_test_keys(doc, uid)
        yield 1, doc


def iter_documents(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[_LineItem]:
    """(line, JSON value or the Exception that line raised) for one file
    (``iter_items``, parsed)."""
    for line, item in iter_items(path, on_read):
        yield line, parse_item(item)


# --- Importing ---------------------------------------------------------------

# Above this many bytes of input, worker processes parse, convert and flatten
# while this process reads the files and writes (bench/ooni_import_bench.py);
# below it their start-up is not worth it.
WORKER_BYTES = 4 * 1024 * 1024
# At most this many worker processes (one a core: parsing and flattening
# take ~550 us of CPU a measurement, the writer ~360, DuckDB's ~250 of it).
MAX_WORKERS = 8
# DuckDB's buffer pool during an import (its default is 80% of RAM): the
# import's memory stays flat whatever the file size (docs/benchmarks.md).
IMPORT_MEMORY_LIMIT = "256MB"


class _Unreadable(ValueError):
    """A file, or the rest of one, that could not be read: reported with
    the file, not counted as a record (the summary's ``records`` are JSON
    documents read)."""


@dataclass
class _Chunk:
    """Up to a batch of lines as read, not parsed yet: (file, line, item)
    each (``iter_items``; an Exception for what could not be read), and how
    many files were begun in it. Cheap to send to a worker: raw bytes."""

    files: int = 0
    items: list[tuple[str, int, Any]] = field(default_factory=list)


@dataclass
class _Batch:
    """One chunk parsed and flattened, for the writer: what reading found
    in it (``read``: counts and bad lines, in the order they were met), its
    distinct measurements' ids and where each came from, their rows as Arrow
    tables (``probes.store.arrow_tables``)."""

    read: ImportSummary
    ids: list[str]
    where: dict[str, tuple[str, int]]
    tables: dict[str, Any]


def _chunks(files: list[Path], batch_size: int, on_read: Callable[[int], None] | None = None) -> Iterator[_Chunk]:
    """Read ``files`` into chunks of ``batch_size`` lines (the last may be
    empty: it still counts its files). Reading is this process's: what it
    costs is gunzip and cutting lines, ~40 us a measurement."""
    chunk = _Chunk()
    for path in files:
        chunk.files += 1
        name = str(path)
        try:
            for line, item in iter_items(path, on_read):
                chunk.items.append((name, line, item))
                if len(chunk.items) >= batch_size:
                    yield chunk
                    chunk = _Chunk()
        except OSError as exc:
            chunk.items.append((name, 0, _Unreadable(f"cannot read: {exc.strerror or _short(exc)}")))
        except Exception as exc:  # a file our reader chokes on: it alone is reported, the others are read
            chunk.items.append((name, 0, _Unreadable(f"cannot read: {type(exc).__name__}: {_short(exc)}")))
    yield chunk


def _flatten_chunk(chunk: _Chunk) -> _Batch:
    """Parse, convert and flatten one chunk (in a worker process, or in
    this one for small imports): the same batch either way."""
    read = ImportSummary(files=chunk.files)
    batch: list[tuple[dict[str, Any], str | None]] = []
    where: dict[str, tuple[str, int]] = {}
    for name, line, item in chunk.items:
        if isinstance(item, _Unreadable):
            read.add_error(name, line, str(item))
            continue
        read.records += 1
        doc = parse_item(item)
        if isinstance(doc, Exception):
            read.add_error(name, line, str(doc))
            continue
        if not isinstance(doc, dict):
            read.add_error(name, line, f"not a JSON object but {type(doc).__name__}")
            continue
        test = doc.get("test_name")
        if "test_keys" not in doc or not isinstance(test, str):
            read.not_measurements += 1
            continue
        if test not in IMPORTED_TESTS:
            read.skipped[test] = read.skipped.get(test, 0) + 1
            continue
        try:
            record = record_from_ooni(doc)
        except Exception as exc:  # a record the converter cannot read: it alone is lost
            read.add_error(name, line, f"cannot convert: {type(exc).__name__}: {_short(exc)}")
            continue
        version = doc.get("test_version")
        version = version if isinstance(version, str) else "unknown"
        read.versions[version] = read.versions.get(version, 0) + 1
        mid = record["measurement_id"]
        if mid in where:  # twice in one chunk: the first one counts
            read.duplicates += 1
            continue
        where[mid] = (name, line)
        batch.append((record, None))

    def refused(item: tuple[dict[str, Any], str | None], exc: BaseException) -> None:
        file, line = where.pop(item[0]["measurement_id"], ("?", 0))
        read.add_error(file, line, f"not stored: {_short(exc)}")

    tables, ids = store.arrow_tables_each(batch, refused)
    return _Batch(read, ids, where, tables)


def _merge(summary: ImportSummary, read: ImportSummary) -> None:
    summary.files += read.files
    summary.records += read.records
    summary.duplicates += read.duplicates
    summary.not_measurements += read.not_measurements
    for name, count in read.skipped.items():
        summary.skipped[name] = summary.skipped.get(name, 0) + count
    for version, count in read.versions.items():
        summary.versions[version] = summary.versions.get(version, 0) + count
    summary.bad += read.bad
    summary.errors += read.errors[:max(0, MAX_ERRORS_LISTED - len(summary.errors))]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (a container's share)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def import_ooni(con, paths: Iterable[str | os.PathLike], *, batch_size: int = 1000,
                on_progress: Callable[[int, int], None] | None = None, worker: bool | None = None,
                workers: int | None = None) -> ImportSummary:
    """Import OONI measurement files and directories into the database
    ``con`` (probes.store.connect). ``on_progress(bytes_read, bytes_total)``
    is called as the files are read (compressed bytes). ``worker``: parse
    and flatten in worker processes (``workers`` of them, default one a
    core up to MAX_WORKERS), else in this one (default: workers when the
    input is over WORKER_BYTES and there are two cores). Returns the
    summary; raises OoniImportError only for a path that does not exist, or
    when a worker process dies."""
    files = iter_files(paths)
    total = sum(p.stat().st_size for p in files)
    if worker is None:
        worker = total >= WORKER_BYTES and _cores() >= 2
    summary = ImportSummary()
    done = 0

    def progressed(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total)

    def write(batch: _Batch) -> None:
        _merge(summary, batch.read)

        def refused(mid: str, exc: BaseException) -> None:
            file, line = batch.where.get(mid, ("?", 0))
            summary.add_error(file, line, f"not stored: {_short(exc)}")

        before = summary.bad
        stored = store.insert_each(con, batch.tables, batch.ids, refused) if batch.ids else 0
        summary.imported += stored
        summary.duplicates += len(batch.ids) - stored - (summary.bad - before)

    chunks = _chunks(files, batch_size, progressed)
    batches = (_in_workers(chunks, workers or min(MAX_WORKERS, _cores())) if worker
               else map(_flatten_chunk, chunks))
    try:
        with store.memory_limit(con, IMPORT_MEMORY_LIMIT), store.bulk_gc() as collect:
            for batch in batches:
                write(batch)
                collect()
    finally:  # also when writing fails or is interrupted: the workers stop, the files close, now
        if worker:
            batches.close()
        chunks.close()
    return summary


# --- Worker processes --------------------------------------------------------


def _worker_started() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the writer's to handle: it stops the workers


def _flatten_in_worker(chunk: _Chunk) -> _Batch:
    with store.bulk_gc() as collect:
        batch = _flatten_chunk(chunk)
        collect()
    return batch


def _in_workers(chunks: Iterator[_Chunk], workers: int) -> Iterator[_Batch]:
    """``_flatten_chunk`` of every chunk in ``workers`` processes, the
    batches in the order of the chunks. At most ``workers`` chunks are out
    while the caller writes the last batch: what bounds the memory held
    between the processes, whatever the input's size."""
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding DuckDB's threads
    pool = ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_worker_started)
    pending: collections.deque = collections.deque()
    started: dict[int, Any] = {}  # every worker process, for the exit code of the one that died

    def died() -> OoniImportError:
        for process in started.values():
            process.join(1)  # its exit code is known once it is reaped
        codes = [p.exitcode for p in started.values() if p.exitcode]
        first = [c for c in codes if c != -signal.SIGTERM] or codes  # the pool ends the others with SIGTERM
        return OoniImportError(f"a worker process of the import died (exit code {first[0] if first else '?'})")

    def submit(chunk: _Chunk) -> None:
        try:
            pending.append(pool.submit(_flatten_in_worker, chunk))
        except BrokenProcessPool:
            raise died() from None
        started.update(getattr(pool, "_processes", None) or {})  # the executor starts them as work comes

    def result(future) -> _Batch:
        try:
            return future.result()
        except BrokenProcessPool:
            raise died() from None
        except Exception as exc:  # the writer raises it: nothing is lost silently
            raise OoniImportError(f"flattening failed in a worker process: {type(exc).__name__}: {_short(exc)}") from None

    try:
        for chunk in chunks:
            submit(chunk)
            if len(pending) > workers:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
    finally:
        # Also when stopped early (Ctrl-C, an error, a worker that died):
        # what has not started is cancelled, the chunks being flattened (a
        # second at most; the workers ignore Ctrl-C) are waited for. Ending
        # the workers instead could cut a result mid-message and leave the
        # pool's reader thread, and so the interpreter's exit, waiting forever.
        pool.shutdown(wait=True, cancel_futures=True)
