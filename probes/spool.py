"""The probe's spool: `vantage run` measures without DuckDB in its process.

DuckDB's library and allocator cost a process ~55-70 MB (docs/benchmarks.md),
and a measuring process ~50 MB; side by side they never fit the probe's
memory budget. So they never run side by side: `vantage run` first opens the
database (``prepare``: open and migrate, store what earlier runs left, what a
resumed run has left to do), then forks the process that measures
(``measure_apart``), which only appends finished measurements to a spool file
beside the database, and once that process has exited stores the spools
(``store_runs``). As its own program, `vantage run` does both database steps
by becoming the database process and coming back (``hand_over``: exec, the
same pid), so not even the waiting command is beside DuckDB; called from
Python (click's test runner), it uses a child process and stores in-process.

- ``SpoolSink`` is the runner's sink. A new run's first line is what
  ``runner.start_run`` records (its inputs, options, location); then ``aput``
  returns once the record's line is written to
  ``<db>.spool-<run id>.jsonl`` (O_APPEND, from a thread), so a measurement
  the run has counted survives the process being killed, even with SIGKILL;
  a timer thread fdatasyncs the file every second while it is open (and it is
  fsync'd at the end), so a power cut loses at most the last second of a run. A spool line
  is a rescue-file line (``store.rescue_line``): ``vantage results
  import-rescue`` reads a spool as it is.
- At the end of a run the measuring process appends an end line (the run's
  status and what the spool could not take) and exits; `vantage run` stores
  the spool through ``store.Sink`` (batches, a record that fails alone goes
  to the rescue file), marks the run, checkpoints and deletes the spool.
  Progress and warnings of the measuring process reach the terminal through
  a pipe; Ctrl-C stops it (forwarded when sent to `vantage run` alone); it
  dies with `vantage run` (PR_SET_PDEATHSIG), so a SIGKILL of either leaves
  spools, never a run still measuring.
- Every `vantage run` first stores what an earlier run left in a spool
  (killed, power cut, the database busy at the end): a spool without its
  end line is a run cut short, marked ``interrupted`` so ``--resume``
  finishes it. Storing is idempotent (measurement ids), so a spool stored
  twice is harmless.
- ``RunLock``: one `vantage run` per database at a time (fcntl.flock on
  ``<db>.run.lock``, held by the children too): a second run is refused, a
  scheduled one (``--unattended``) is skipped; a spool is never read while
  its run is still writing it.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from core import paths
from core.download import fsync_dir
from core.errors import VantageError

from .store import Sink, StoreError, rescue_line

SPOOL_FSYNC_SECONDS = 1.0  # the timer thread's period: a power cut loses at most this much of a run
BUSY_WAIT_SECONDS = 60.0  # how long storing waits for a database another program holds open


def spool_path(db_file: str | os.PathLike, run_id: str) -> Path:
    """``<db file name>.spool-<run id>.jsonl`` beside the database: the whole
    name, like the lock's, so ``v.duckdb`` and ``v.db`` never share spools."""
    db = Path(db_file)
    return paths.beside_db(db_file, f".spool-{run_id}.jsonl")


def spools(db_file: str | os.PathLike) -> list[Path]:
    """Spool files an earlier run left beside the database, oldest first."""
    db = Path(db_file)
    found = list(db.parent.glob(f"{glob.escape(paths.beside_db(db, '.spool-').name)}*.jsonl")) if db.parent.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _run_of(spool: Path, db_file: str | os.PathLike) -> str:
    return spool.name[len(paths.beside_db(db_file, ".spool-").name):-len(".jsonl")]


# --------------------------------------------------------------------------
# One run per database at a time.

class RunLock:
    """An exclusive, non-blocking flock on ``<db>.run.lock``; the holder's pid
    is written in the file. The kernel drops the lock when the holder (and
    every child it passed the descriptor to) is gone: no stale locks."""

    def __init__(self, db_file: str | os.PathLike):
        self.db = Path(db_file)
        self.path = paths.beside_db(db_file, ".run.lock")
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock (``wait``: until the holder is done); False when another run holds it.
        StoreError (one line, as ``store.connect`` words it) when the lock file cannot be made."""
        db = self.db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory for the database {db}: {exc.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            raise StoreError(f"cannot write the database in {self.path.parent}: permission denied") from None
        except OSError as exc:
            raise StoreError(f"cannot use the database {db}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _HELD.add(fd)
        return True

    def adopt(self, fd: int) -> "RunLock":
        """Take over the lock this process held before it exec'd (``hand_over``):
        the same descriptor, still locked."""
        os.fstat(fd)  # OSError when it is not open: the hand-over lost it
        self.fd = fd
        _HELD.add(fd)
        return self

    def holder(self) -> int | None:
        """The pid of the run holding the lock, or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# Lock descriptors this process holds: passed to the process that prepares the
# database (``python -m probes.spool prepare``), so it keeps the database
# locked even if its parent dies.
_HELD: set[int] = set()


# --------------------------------------------------------------------------
# The measuring side.

class SpoolSink(Sink):
    """``store.Sink`` for the measuring process: the same interface (``put``,
    ``aput``, ``failed``, ``run_status``, ``close``, the counters), but records
    go to the spool file. Nothing is stored in the database here: `vantage
    run` stores the spool once the measuring process is gone (``store_runs``)."""

    def __init__(self, path: str | os.PathLike, rescue_path: str | os.PathLike | None = None,
                 start: dict[str, Any] | None = None):
        """``start`` (a new run: ``start_entry``) is the spool's first line:
        `vantage run` records the run from it when it stores the spool, so
        the measuring process never opens the database."""
        # No writer thread: writes happen in the thread that hands the record over.
        self.con = None
        self.path = Path(path)
        self.rescue_path = Path(rescue_path) if rescue_path else None
        self.rescued = self.not_stored = self.written = 0
        self.last_failure = self.error = None
        self._failing = 0
        self._lock = threading.Lock()
        self._dirty = False  # written since the last sync
        self._closed = threading.Event()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if start is not None:
            try:
                _write_all(self._fd, (json.dumps({"start": start}) + "\n").encode())
                os.fsync(self._fd)
            except OSError as exc:
                self._close_fd()
                raise StoreError(f"cannot write the spool {self.path}: {exc.strerror}") from None
        self._syncer = threading.Thread(target=self._sync_loop, name="vantage-spool-sync", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        """Every SPOOL_FSYNC_SECONDS while the spool is open: fdatasync what was
        written since the last sync (however long until the next record)."""
        while not self._closed.wait(SPOOL_FSYNC_SECONDS):
            with self._lock:
                if self._fd is None:
                    return
                if not self._dirty:
                    continue
                try:
                    os.fdatasync(self._fd)
                    self._dirty = False
                except OSError as exc:  # an I/O error: the next record stops the run (store_failed)
                    if self.error is None:
                        self.error = exc

    def _offer(self, item) -> bool:
        return False  # never write on the event loop: aput hands every record to a thread

    def _wait_put(self, item) -> None:
        record, category = item
        try:
            line = rescue_line(record, category).encode("utf-8")
        except Exception as exc:  # unserialisable: a bug, but lose nothing else
            self._not_stored(item, exc)
            return
        with self._lock:
            if self.error is not None or self._fd is None:
                self._not_stored(item, self.error or StoreError("the spool is closed"))
                return
            try:
                _write_all(self._fd, line)
                self._dirty = True  # the timer thread syncs it within SPOOL_FSYNC_SECONDS
            except OSError as exc:  # disk full, I/O error: the run stops (store_failed)
                self.error = exc
                self._not_stored(item, exc)
                return
            self.written += 1

    def call(self, fn, *args) -> None:
        raise TypeError("a spool takes records only")

    def end(self, status: str) -> None:
        """Close the spool with its end line: the runner's status and what the
        spool could not take (``store_runs`` adds it to the run's outcome)."""
        with self._lock:
            if self._fd is None:
                return
            entry = {"end": {"status": status, "not_stored": self.not_stored, "rescued": self.rescued,
                             "error": _first_line(self.error) if self.error else None}}
            try:
                _write_all(self._fd, (json.dumps(entry) + "\n").encode())
            except OSError:
                pass  # store_runs then takes the run for one cut short: still nothing lost
            self._close_fd()

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def _close_fd(self) -> None:
        self._closed.set()
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


def _fsync_file_and_dir(path: Path) -> None:
    """fsync ``path`` and the directory entry naming it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------
# Calls into the database process.

def _child(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``task`` in ``python -m probes.spool``; its VantageError comes back
    as a StoreError (one line), anything else as an internal error."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "probes.spool", task], input=json.dumps(payload), capture_output=True,
                          text=True, env=env, pass_fds=tuple(_HELD), start_new_session=True)
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the database process failed ({proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1]}") from None
    return _checked(answer)


def _checked(answer: dict[str, Any]) -> dict[str, Any]:
    """A task's answer, or its failure raised: a StoreError (one line) or an internal error."""
    if "error" in answer:
        raise StoreError(answer["error"])
    if "internal" in answer:
        raise RuntimeError(answer["internal"])
    return answer


def prepare(db_file: str, resume_id: str | None = None) -> dict[str, Any]:
    """Open (create, migrate) the database, store what earlier runs left in
    spools, and with ``resume_id`` say what that run has left to do:
    ``{"recovered": [{"run_id", "stored", "status"}], "resume": None | {"test",
    "options", "inputs"}}``; ``resume`` has ``"missing": true`` when the
    database has no such run."""
    return _child("prepare", {"db": db_file, "resume": resume_id})


def start_entry(run_id: str, test_name: str, inputs, options: dict, location) -> dict[str, Any]:
    """What ``runner.start_run`` records, as the spool's first line."""
    return {"run_id": run_id, "test": test_name, "inputs": [list(i) for i in inputs], "options": options,
            "location": {"probe_cc": location.probe_cc, "probe_asn": location.probe_asn}}


# --------------------------------------------------------------------------
# The measuring process: a fork of `vantage run` that never holds DuckDB.
#
# Summed, a measuring process (~50 MB: aiohttp, dnspython, the tests) and a
# DuckDB process (~55 MB for DuckDB alone, before a single insert) never fit a
# Raspberry Pi's 100 MB budget side by side (docs/benchmarks.md). So they never
# live side by side: `vantage run` forks the process that measures, waits for
# it with nothing but the CLI in memory (~27 MB), and only once it is gone
# stores the spools (by a hand-over, below, or itself).

STORE_BATCH = 50  # records per transaction when a spool is stored (fewer: less DuckDB memory, slower)
STORE_QUEUE = 50


class MeasuringDied(VantageError):
    """The measuring process was killed (OOM killer, a signal to it alone)."""


def _send(fd: int, message: tuple) -> None:
    import pickle

    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        _write_all(fd, len(data).to_bytes(4, "big") + data)
    except OSError:  # the parent is gone: PR_SET_PDEATHSIG ends this process
        pass


def _messages(fd: int):
    """The measuring process's messages, until it closes the pipe (or dies)."""
    import pickle

    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + size:
                break
            message, buffer = pickle.loads(buffer[4:4 + size]), buffer[4 + size:]
            yield message


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (a `kill -9` of `vantage run`
    must not leave a measuring orphan holding the run lock). Linux only."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _RunsRelay(dict):
    """``runs`` in the measuring process: every status set is told to the parent."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def __setitem__(self, run_id: str, status: str) -> None:
        super().__setitem__(run_id, status)
        _send(self.fd, ("run", run_id, status))


async def measure_apart(measure, db_file: str, *, progress=None, warn=None, runs: dict[str, str] | None = None,
                        hand_over=None):
    """Run ``await measure(progress=, warn=, runs=)`` (``runner.run_tests``'s
    measuring, whose sink is a ``SpoolSink`` that ends each spool with its end
    line) in a forked process, relay its progress and warnings here, then,
    once it has exited, store every spool it wrote and mark the runs (this
    process: ``store_runs``). Returns ``measure``'s summaries with the final
    statuses. Ctrl-C reaches the measuring process (forwarded if sent to this
    one alone): it stops measuring, the spools are stored, and
    KeyboardInterrupt is raised here as `vantage run` expects. A measuring
    process killed outright leaves its spools, stored here as interrupted.

    ``hand_over(ended)``, when given, stores elsewhere and never returns
    (`vantage run` becomes the database process: ``hand_over`` below), and
    the command finishes with ``conclude(ended, finals)``."""
    import signal
    import sys as _sys

    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    for stream in (_sys.stdout, _sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    import gc

    # What the parent holds stays out of the child's garbage collections: a
    # child that collected a parent's DuckDB object (a caller that had a
    # connection) ran its destructor without DuckDB's threads and crashed;
    # and the pages stay shared (copy-on-write) instead of touched.
    gc.freeze()
    pid = os.fork()
    if pid:
        gc.unfreeze()
    if pid == 0:  # ------------------------------------------------ the measuring process
        # A Ctrl-C before _measure_here's own handler is noted, not raised: a
        # KeyboardInterrupt here would end this process without the spool's end line.
        signal.signal(signal.SIGINT, _note_early_interrupt)
        os.close(read_fd)
        code = 0
        try:
            _die_with_parent(parent)
            import asyncio

            # The caller's event loop is not this process's (asyncio ties a running
            # loop to its pid, and its epoll set is shared with the parent): a new one.
            asyncio.run(_measure_here(measure, write_fd))
        except BaseException:  # never back into the caller's code: this process only measures
            code = 1
            if os.environ.get("VANTAGE_DEBUG"):
                import traceback

                traceback.print_exc()
        finally:
            for stream in (_sys.stdout, _sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)
    # ------------------------------------------------------------------- this process
    os.close(write_fd)

    def forward(signum, frame):  # Ctrl-C sent to this process alone: the measuring process stops
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    previous = signal.signal(signal.SIGINT, forward)
    outcome: tuple | None = None
    started: dict[str, str] = {}
    shown = None  # the progress display of the test being measured
    on_result = None
    try:
        try:
            for message in _messages(read_fd):
                kind = message[0]
                if kind == "run":
                    started[message[1]] = message[2]
                    if runs is not None:
                        runs[message[1]] = message[2]
                elif kind == "test":
                    shown = (progress or _no_progress)(message[1], message[2])
                    on_result = shown.__enter__()
                elif kind == "result":
                    if on_result:
                        on_result(message[1], message[2])
                elif kind == "test_end":
                    if shown is not None:
                        shown.__exit__(None, None, None)
                        shown = on_result = None
                elif kind == "warn":
                    if warn:
                        warn(message[1])
                else:  # done, interrupted, error: the last word
                    outcome = message
        finally:
            if shown is not None:
                shown.__exit__(None, None, None)
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
        # Storing takes seconds and loses nothing if cut, but is not cut by Ctrl-C
        # (the measuring process was the one to stop; as the database process was).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ended = {"outcome": outcome, "started": list(started), "statuses": dict(started), "status": status}
        if hand_over is not None:
            hand_over(ended)
        finals = store_runs(db_file, list(started))
    finally:
        signal.signal(signal.SIGINT, previous)
    return conclude(ended, finals, runs)


def conclude(ended: dict[str, Any], finals: dict[str, str], runs: dict[str, str] | None = None):
    """``measure_apart``'s outcome once the spools are stored: the summaries
    with the runs' final statuses (also set in ``runs``), or the measuring
    process's exception, KeyboardInterrupt for a run stopped by Ctrl-C,
    MeasuringDied for a measuring process killed outright."""
    outcome, status = ended["outcome"], ended["status"]
    summaries = outcome[1] if outcome and outcome[0] in ("done", "interrupted") else []
    if runs is not None:
        runs.update(ended["statuses"])
    for run_id, final in finals.items():
        if runs is not None:
            runs[run_id] = final
        for summary in summaries:
            if summary.run_id == run_id:
                summary.status = final
    if outcome is None:
        how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        cut = [r for r, s in finals.items() if s == "interrupted"]
        hint = f"; finish with `vantage run --resume {cut[0]}`" if cut else ""
        raise MeasuringDied(f"the measuring process {how}; what it finished is stored{hint}")
    if outcome[0] == "error":
        raise outcome[1]
    if outcome[0] == "interrupted":  # (a Ctrl-C after the last measurement changes nothing)
        raise KeyboardInterrupt
    return summaries


_early_interrupt = False


def _note_early_interrupt(signum, frame) -> None:
    global _early_interrupt
    _early_interrupt = True


async def _measure_here(measure, fd: int) -> None:
    """The measuring process's side of ``measure_apart``."""
    import asyncio
    import contextlib
    import signal

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopping = False

    def stop(signum, frame):  # once: a second Ctrl-C must not cut the spool's end line
        nonlocal stopping
        if not stopping:
            stopping = True
            loop.call_soon_threadsafe(task.cancel)

    signal.signal(signal.SIGINT, stop)
    if _early_interrupt:  # Ctrl-C came between the fork and this handler
        stop(signal.SIGINT, None)

    @contextlib.contextmanager
    def progress(name: str, total: int):
        _send(fd, ("test", name, total))
        try:
            yield lambda url, label: _send(fd, ("result", url, label))
        finally:
            _send(fd, ("test_end",))

    try:
        summaries = await measure(progress=progress, warn=lambda text: _send(fd, ("warn", text)), runs=_RunsRelay(fd))
    except (asyncio.CancelledError, KeyboardInterrupt):
        _send(fd, ("interrupted", []))
        return
    except BaseException as exc:
        try:
            import pickle

            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {_first_line(exc)}")
        _send(fd, ("error", exc))
        return
    _send(fd, ("done", summaries))


def _no_progress(name: str, total: int):
    import contextlib

    return contextlib.nullcontext()


def store_runs(db_file: str, run_ids: list[str]) -> dict[str, str]:
    """Store the spools of ``run_ids`` in this process, in order, and mark
    their runs; returns each run's final status. Raises StoreError when the
    database cannot be opened (the spools wait for the next run) or refused
    writes (after storing what it could)."""
    todo = [(run_id, spool_path(db_file, run_id)) for run_id in run_ids]
    todo = [(run_id, path) for run_id, path in todo if path.exists()]
    if not todo:
        return {}
    try:
        con = _connect(db_file)
    except StoreError as exc:  # the database could not be opened: the spools keep every measurement
        kept = ", ".join(str(path) for _, path in todo)
        raise StoreError(f"{exc}; the measurements of this run are kept in {kept} and the next `vantage run` "
                         "stores them") from None
    finals: dict[str, str] = {}
    failed = None
    try:
        for run_id, path in todo:
            answer = store_spool(con, db_file, path)
            finals[run_id] = answer["status"]
            failed = failed or answer.get("failed")
    finally:
        con.close()
    if failed:
        raise StoreError(failed)
    return finals


# --------------------------------------------------------------------------
# Hand-over: `vantage run` becomes the database process, and back.
#
# A database process peaks at ~100-110 MB on its own (DuckDB's library pages
# and allocator, docs/benchmarks.md); beside it, a waiting `vantage run`
# (~29 MB) took the probe past its budget. So when `vantage run` is the
# process's own program, it does not wait for a database process: it becomes
# one. ``hand_over`` exec's ``python -m probes.spool stage FD`` in its place
# (same pid, terminal and run lock; none of its modules or memory), which does
# the task and then exec's the same `vantage run` command line again; there
# ``handed_back`` returns the task's answer and what the command carried over.
# The state travels in an anonymous memory file (memfd) the exec's keep open:
# no file on disk to go stale, be linked or be read by another user.

STAGE_ENV = "VANTAGE_RUN_STAGE"  # the hand-over's descriptor, in the process that comes back
_MEMFD_NAME = "vantage-run-stage"

_sigint_ignored: bool | None = None  # how the command started: kept through every hand-over


def hand_over(task: str, payload: dict[str, Any], lock: RunLock, carry: dict[str, Any]):
    """Become ``python -m probes.spool stage``, which runs ``task`` (as
    ``prepare`` or ``store_runs`` would) and then becomes this command line
    again. Never returns. ``carry`` (JSON) comes back with the answer."""
    import signal

    ignored = _sigint_ignored if _sigint_ignored is not None else signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    state = {"pid": os.getpid(), "task": task, "payload": payload, "carry": carry, "lock_fd": lock.fd,
             "argv": [sys.executable, *sys.orig_argv[1:]], "sigint_ignored": ignored,
             "pythonpath": os.environ.get("PYTHONPATH")}
    fd = os.memfd_create(_MEMFD_NAME, 0)
    _write_state(fd, state)
    os.set_inheritable(fd, True)
    os.set_inheritable(lock.fd, True)
    for stream in (sys.stdout, sys.stderr):  # what the command printed must not die with its buffers
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, state["pythonpath"]) if p))
    env.pop(STAGE_ENV, None)
    # Ignored across the exec (a disposition exec keeps): the new image's start is not cut; _stage decides.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "probes.spool", "stage", str(fd)], env)
    except OSError as exc:
        signal.signal(signal.SIGINT, previous)
        os.close(fd)
        raise StoreError(f"cannot start the database process ({sys.executable}): {exc.strerror}") from None


def handed_back() -> dict[str, Any] | None:
    """In the command a hand-over came back to: ``{"task", "answer", "carry",
    "lock_fd"}``, else None. The variable is removed from the environment so
    no child inherits it."""
    global _sigint_ignored
    value = os.environ.pop(STAGE_ENV, None)
    if not value:
        return None
    fd = _stage_fd(value)
    try:
        state = _read_state(fd)
    finally:
        os.close(fd)
    if state.get("pid") != os.getpid() or "answer" not in state:
        raise StoreError("the hand-over of this run is not this process's: the next `vantage run` stores what "
                         "it measured")
    _sigint_ignored = bool(state.get("sigint_ignored"))
    return state


def _stage_fd(value: str) -> int:
    """The hand-over's descriptor named by ``value``: open, and our memfd."""
    try:
        fd = int(value)
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{_MEMFD_NAME}"):
            raise ValueError
    except (ValueError, OSError):
        raise StoreError(f"{STAGE_ENV}={value}: not a hand-over of `vantage run` (unset it)") from None
    return fd


def _read_state(fd: int) -> dict[str, Any]:
    try:
        size = os.fstat(fd).st_size
        state = json.loads(os.pread(fd, size, 0).decode("utf-8")) if size else None
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict):
        raise StoreError("the hand-over of this run is unreadable: the next `vantage run` stores what it measured")
    return state


def _write_state(fd: int, state: dict[str, Any]) -> None:
    data = json.dumps(state, default=str).encode()
    os.ftruncate(fd, 0)
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], written)


def prepared(state: dict[str, Any]) -> dict[str, Any]:
    """``prepare``'s answer, from the hand-over ``prepare_elsewhere`` began;
    KeyboardInterrupt when a Ctrl-C came while it prepared."""
    if state["answer"].get("interrupted"):
        raise KeyboardInterrupt
    return _checked(state["answer"])


def prepare_elsewhere(db_file: str, resume_id: str | None, lock: RunLock, carry: dict[str, Any]):
    """``prepare`` by a hand-over: never returns; the command comes back with
    ``handed_back()["task"] == "prepare"``."""
    hand_over("prepare", {"db": db_file, "resume": resume_id}, lock, carry)


def store_elsewhere(db_file: str, lock: RunLock, carry: dict[str, Any]):
    """``measure_apart``'s ``hand_over`` for `vantage run`: the spools stored
    by the database process this command becomes; it comes back with
    ``handed_back()["task"] == "store"``, and ``stored`` concludes."""
    import base64
    import pickle

    def store(ended: dict[str, Any]):
        packed = base64.b64encode(pickle.dumps(ended, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")
        hand_over("store", {"db": db_file, "run_ids": ended["started"]}, lock, dict(carry, ended=packed))

    return store


def stored(state: dict[str, Any], runs: dict[str, str] | None = None):
    """What ``measure_apart`` returns (or raises), once the hand-over of
    ``store_elsewhere`` has stored the spools. (The pickle is this run's own,
    in a memfd only this process held.)"""
    import base64
    import pickle

    ended = pickle.loads(base64.b64decode(state["carry"]["ended"]))
    if runs is not None:  # also when storing failed: an unattended run records which runs it was
        runs.update(ended["statuses"])
    return conclude(ended, _checked(state["answer"])["finals"], runs)


_stop_asked = False  # a Ctrl-C while preparing (the database image of a hand-over)


def _ask_stop(signum, frame) -> None:
    """Ctrl-C while preparing: noted once (a second one is ignored), acted on
    at ``_stop_point``, never inside DuckDB or the Sink."""
    import signal

    global _stop_asked
    _stop_asked = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_point() -> None:
    if _stop_asked:
        raise KeyboardInterrupt


def _stage(value: str):
    """``python -m probes.spool stage FD``: the task, then back to the
    command. What fails here is one line on stderr and exit 2: the spools
    keep every measurement for the next run."""
    import signal

    try:
        fd = _stage_fd(value)
        state = _read_state(fd)
        argv = state["argv"]
    except (StoreError, KeyError, TypeError) as exc:
        sys.stderr.write(f"vantage: {exc}\n")
        sys.exit(2)
    if state["task"] == "prepare" and not state.get("sigint_ignored"):
        # Prepare may wait a minute for a busy database: Ctrl-C ends it at the
        # next stop point (between spools, while waiting), and the command,
        # back, stops before it measures.
        signal.signal(signal.SIGINT, _ask_stop)
    try:
        state["answer"] = _answer(state["task"], state["payload"])
    except KeyboardInterrupt:
        state["answer"] = {"interrupted": True}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _stop_asked:
        state["answer"]["interrupted"] = True
    try:
        _write_state(fd, state)
    except OSError as exc:
        sys.stderr.write(f"vantage: the hand-over failed: {exc.strerror}; the measurements wait in their spools "
                         "for the next `vantage run`\n")
        sys.exit(2)
    env = dict(os.environ)
    if state.get("pythonpath") is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = state["pythonpath"]
    env[STAGE_ENV] = str(fd)
    # exec keeps an ignored SIGINT ignored: the command gets back the Ctrl-C it started with.
    signal.signal(signal.SIGINT, signal.SIG_IGN if state.get("sigint_ignored") else signal.SIG_DFL)
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        sys.stderr.write(f"vantage: cannot come back to the command ({argv[0]}): {exc.strerror}\n")
        sys.exit(2)


def _task_store(payload: dict[str, Any]) -> dict[str, Any]:
    return {"finals": store_runs(payload["db"], payload["run_ids"])}


# --------------------------------------------------------------------------
# The database process: each task opens the database, does its work, exits.

def _connect(db_file: str):
    """``store.connect`` for the probe, waiting a while for a database another
    program (an analysis, an upload) holds open."""
    from . import store

    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    while True:
        try:
            return store.connect(db_file, **store.PROBE_LIMITS)
        except StoreError as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            _stop_point()


def store_spool(con, db_file: str, spool: Path) -> dict[str, Any]:
    """Store one spool through ``store.Sink`` and mark its run: the status of
    its end line, or ``interrupted`` for a run cut short. The spool is
    deleted once every record in it is stored or in the rescue file."""
    from . import runner
    from .store import Sink

    run_id = _run_of(spool, db_file)
    sink = Sink(con, batch_size=STORE_BATCH, queue_size=STORE_QUEUE, rescue_path=runner.rescue_path(db_file, run_id))
    end: dict[str, Any] | None = None
    with open(spool, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash: its measurement never counted as finished
            if isinstance(entry, dict) and isinstance(entry.get("start"), dict):
                sink.call(_record_start, entry["start"])  # on the writer thread, before the records
            elif isinstance(entry, dict) and isinstance(entry.get("end"), dict):
                end = entry["end"]
            elif isinstance(entry, dict) and isinstance(entry.get("record"), dict):
                category = entry.get("category_code")
                sink.put(entry["record"], category if isinstance(category, str) else None)
    failed = None
    try:
        sink.close()
    except StoreError as exc:
        failed = str(exc)
    status = (end or {}).get("status") or "interrupted"
    if end:
        sink.not_stored += int(end.get("not_stored") or 0)
        sink.rescued += int(end.get("rescued") or 0)
        if end.get("error") and sink.error is None:
            sink.error = StoreError(end["error"])
            failed = failed or f"writing the measurements failed: {end['error']}"
    marked = False
    try:
        exists = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if exists and (end or exists[0] == "running"):
            status = runner.finish_run(con, run_id, status, sink=sink)
        elif exists:
            status = exists[0]
        con.execute("CHECKPOINT")
        marked = True
    except Exception as exc:  # the database failed: the sink said so, the spool stays
        failed = failed or f"writing to the database failed: {_first_line(exc)}"
    if marked and sink.not_stored <= sink.rescued:  # every record stored, or in the rescue file
        try:
            if sink.rescued:  # the rescue lines reach the disk before the spool that also holds them goes
                _fsync_file_and_dir(sink.rescue_path)
        except OSError as exc:  # the rescue file is not safe: the spool stays (storing it again is harmless)
            failed = failed or f"saving the rescue file failed: {exc.strerror}"
        else:
            spool.unlink(missing_ok=True)
            try:
                fsync_dir(spool.parent)
            except OSError:
                pass
    return {"run_id": run_id, "stored": sink.written, "not_stored": sink.not_stored, "rescued": sink.rescued,
            "status": status, "failed": failed, "ended": end is not None}


def _task_prepare(payload: dict[str, Any]) -> dict[str, Any]:
    from . import runner

    db = payload["db"]
    con = _connect(db)
    try:
        recovered = []
        for spool in spools(db):
            _stop_point()
            recovered.append(store_spool(con, db, spool))
        answer: dict[str, Any] = {"recovered": recovered, "resume": None}
        if payload.get("resume"):
            found = runner.resume(con, payload["resume"])
            answer["resume"] = {"missing": True} if found is None else {
                "test": found.test, "options": found.options, "inputs": found.inputs}
        return answer
    finally:
        con.close()


def _record_start(con, entry: dict[str, Any]) -> None:
    """The run's row and planned inputs, unless an earlier storing of this
    spool recorded them already."""
    from . import runner

    if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [entry["run_id"]]).fetchone():
        return
    # start_run reads the test's name only: the test modules (aiohttp...) stay unloaded here.
    test = runner.Experiment(entry["test"], "", None, None, None)
    runner.start_run(con, entry["run_id"], test, [tuple(i) for i in entry["inputs"]], entry["options"],
                     runner.Location(**entry["location"]))


_TASKS = {"prepare": _task_prepare, "store": _task_store}


def main(argv: list[str]) -> int:
    import signal

    # A stop (Ctrl-C, systemd's KillSignal=SIGINT to the whole cgroup) is for
    # the measuring process: this one finishes storing, which takes seconds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if argv[0] == "stage":
        _stage(argv[1])
    answer = _answer(argv[0], json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    return 0


def _answer(task: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A task's answer: a VantageError as ``{"error"}`` (one line for the
    user), anything else as ``{"internal"}``."""
    try:
        return _TASKS[task](payload)
    except VantageError as exc:
        return {"error": str(exc)}
    except Exception as exc:
        if os.environ.get("VANTAGE_DEBUG"):
            import traceback

            traceback.print_exc()
        return {"internal": f"{type(exc).__name__}: {_first_line(exc)}"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
