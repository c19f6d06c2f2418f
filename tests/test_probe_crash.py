"""The probe killed with SIGKILL mid-run (issue 13): every measurement it
finished reaches its database — at the latest on the next `vantage run` —
and `--resume` completes the rest. A real `vantage run` subprocess against
the loopback servers of tests/servers.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
URLS = 150


@pytest.fixture
def home(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("VANTAGE_DB", None)
    env.pop("VANTAGE_CONFIG", None)
    return env


async def _vantage(args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def _spooled(db: Path) -> tuple[str | None, list[dict]]:
    """The run id and the records of the spool beside ``db`` (complete lines only)."""
    found = list(db.parent.glob(f"{db.name}.spool-*.jsonl"))
    if not found:
        return None, []
    run_id = found[0].name[len(f"{db.name}.spool-"):-len(".jsonl")]
    records = []
    for line in found[0].read_bytes().split(b"\n"):
        try:
            records.append(json.loads(line)["record"])
        except (ValueError, KeyError):
            pass  # a line being written at the kill
    return run_id, records


async def _killed_run(db: Path, urls: list[str], env: dict, after: int) -> tuple[str, list[dict]]:
    """Start `vantage run` over ``urls`` and SIGKILL it once ``after``
    measurements are finished (spooled) and before the last one is."""
    args = ["run", "web", *[a for u in urls for a in ("--url", u)], "--db", str(db), "--yes", "--quiet",
            "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0", "--concurrency", "1"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            _, records = _spooled(db)
            if len(records) >= after:
                break
            assert proc.returncode is None, (await proc.stderr.read()).decode()
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the run never got going")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_id, finished = _spooled(db)  # what the killed process had finished: all of it must be kept
    assert run_id and after <= len(finished) < len(urls), len(finished)
    return run_id, finished


def _stored(db: Path, run_id: str) -> tuple[list[tuple[str, str]], str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT measurement_id, input FROM measurements WHERE run_id = ?", [run_id]).fetchall()
        status = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
    finally:
        con.close()
    return rows, status


async def test_sigkill_mid_run_then_resume_stores_everything_once(tmp_path, home, http_server):
    db = tmp_path / "v.duckdb"
    urls = [http_server.url(f"/page?n={i}") for i in range(URLS)]
    run_id, finished = await _killed_run(db, urls, home, after=10)

    resumed = await _vantage(["run", "--resume", run_id, "--db", str(db), "--yes", "--json"], home)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)[0]["status"] == "finished"

    rows, status = _stored(db, run_id)
    assert status == "finished"
    ids = {mid for mid, _ in rows}
    assert {r["measurement_id"] for r in finished} <= ids  # every measurement finished before the kill
    assert sorted(url for _, url in rows) == sorted(urls)  # and each input exactly once
    assert not list(tmp_path.glob("v.duckdb.spool-*.jsonl"))  # the spool is gone once stored


async def test_the_next_run_stores_what_a_killed_run_finished_and_names_it(tmp_path, home, http_server):
    db = tmp_path / "v.duckdb"
    urls = [http_server.url(f"/page?n={i}") for i in range(URLS)]
    run_id, finished = await _killed_run(db, urls, home, after=5)

    other = await _vantage(["run", "web", "--url", http_server.url("/"), "--db", str(db), "--yes", "--json",
                            "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0"], home)
    assert other.returncode == 0, other.stderr
    assert f"vantage run --resume {run_id}" in other.stderr  # the cut-short run is named, with how to finish it
    rows, status = _stored(db, run_id)
    assert status == "interrupted"
    assert {mid for mid, _ in rows} == {r["measurement_id"] for r in finished}

    resumed = await _vantage(["run", "--resume", run_id, "--db", str(db), "--yes", "--json"], home)
    assert resumed.returncode == 0, resumed.stderr
    rows, status = _stored(db, run_id)
    assert status == "finished" and sorted(url for _, url in rows) == sorted(urls)


def _image(pid: int) -> tuple[list[str], list[int]]:
    """The command line ``pid`` runs now and its children ([] once it is gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return [], []
    return argv, children


async def test_the_database_work_runs_alone_in_the_runs_own_process(tmp_path, home, http_server):
    """`vantage run` becomes its database process (prepare, then storing the
    spools) and comes back (probes/spool.py, the hand-over): the same pid, no
    other process beside it, and the command's output and lock intact."""
    db = tmp_path / "v.duckdb"
    urls = [http_server.url(f"/page?n={i}") for i in range(20)]
    args = ["run", "web", *[a for u in urls for a in ("--url", u)], "--db", str(db), "--yes", "--json", "--no-doh",
            "--probe-cc", "ZZ", "--probe-asn", "AS0"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=home,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    images, measuring_children = [], 0  # what the pid ran, in order: "run" or "database"
    reading = asyncio.ensure_future(proc.communicate())
    while not reading.done():
        argv, children = _image(proc.pid)
        image = "database" if argv[1:4] == ["-m", "probes.spool", "stage"] else "run" if "cli.main" in argv else None
        if image == "database":
            assert children == [], f"a process beside the database process: {children}"
        elif children:
            measuring_children = max(measuring_children, len(children))
        if image and (not images or images[-1] != image):
            images.append(image)
        await asyncio.sleep(0.002)
    out, err = await reading
    assert proc.returncode == 0, err.decode()
    # Prepare, measure, store, print: the database work twice, each time alone.
    assert images == ["run", "database", "run", "database", "run"], images
    assert measuring_children == 1  # while measuring: the forked measuring process, alone
    summary = json.loads(out)
    assert summary[0]["status"] == "finished" and summary[0]["measured"] == 20
    rows, status = _stored(db, summary[0]["run_id"])
    assert status == "finished" and sorted(url for _, url in rows) == sorted(urls)
    assert not list(tmp_path.glob("v.duckdb.spool-*"))
    from probes.spool import RunLock

    assert RunLock(db).holder() is None


# ---------------------------------------------------------------- the spool, stored in-process


def _record(i: int, run: str = "R") -> dict:
    from probes.records import Measurement, new_id

    m = Measurement(test_name="web_connectivity", test_version="0.5.0", input=f"https://s{i}.example/", run_id=run,
                    probe_cc="ZZ", probe_asn="AS0", measurement_id=new_id())
    m.test_keys = {"queries": [], "requests": []}
    return m.to_dict()


def _started(tmp_path, records):
    from probes import runner, store

    db = tmp_path / "v.duckdb"
    con = store.connect(db)
    runner.start_run(con, "R", runner.experiments("web")[0], [(r["input"], None) for r in records], {}, runner.Location())
    return db, con


async def test_a_record_the_database_refuses_fails_alone_and_the_run_is_partial(tmp_path, monkeypatch):
    from probes import runner, spool, store

    records = [_record(i) for i in range(6)]
    db, con = _started(tmp_path, records)
    sink = spool.SpoolSink(spool.spool_path(db, "R"), rescue_path=runner.rescue_path(db, "R"))
    for r in records:
        await sink.aput(r, "NEWS")
    sink.end("finished")

    real = store.insert_rows
    bad = records[2]["measurement_id"]

    def insert_rows(con, table, rows):
        if table == "measurements" and any(r.get("measurement_id") == bad for r in rows):
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate data of size 32.0 MiB")
        return real(con, table, rows)

    monkeypatch.setattr(store, "insert_rows", insert_rows)
    found = spool.store_spool(con, str(db), spool.spool_path(db, "R"))
    assert (found["stored"], found["not_stored"], found["rescued"], found["status"]) == (5, 1, 1, "partial")
    assert con.execute("SELECT status, rescued FROM runs WHERE run_id = 'R'").fetchone() == ("partial", 1)
    [line] = runner.rescue_path(db, "R").read_text().splitlines()
    assert json.loads(line)["record"]["measurement_id"] == bad
    assert not spool.spool_path(db, "R").exists()  # every record is stored or in the rescue file

    monkeypatch.undo()
    assert store.import_rescue(con, runner.rescue_path(db, "R")) == (1, 0)
    assert con.execute("SELECT status FROM runs WHERE run_id = 'R'").fetchone()[0] == "finished"


async def test_a_spool_cut_by_a_crash_is_an_interrupted_run_and_reads_as_a_rescue_file(tmp_path):
    from probes import runner, spool, store

    records = [_record(i) for i in range(4)]
    db, con = _started(tmp_path, records)
    path = spool.spool_path(db, "R")
    sink = spool.SpoolSink(path)
    for r in records[:3]:
        await sink.aput(r, None)
    sink.close()  # no end line: the process died
    with path.open("a") as fh:
        fh.write('{"category_code": null, "record": {"measurement_id": "cut')  # the line being written at the kill
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())

    found = spool.store_spool(con, str(db), path)
    assert found["status"] == "interrupted" and not found["ended"] and found["stored"] == 3
    assert con.execute("SELECT status FROM runs WHERE run_id = 'R'").fetchone()[0] == "interrupted"
    assert [i for i, _ in runner.remaining_inputs(con, "R")] == [records[3]["input"]]
    assert not path.exists()
    # A spool reads as a rescue file, as it is (`vantage results import-rescue`): stored already, and the cut line.
    assert store.import_rescue(con, copy) == (0, 4)


def test_a_full_disk_stops_the_run_and_loses_nothing_counted(tmp_path):
    """The spool refuses writes (ENOSPC): the sink fails (the runner stops,
    store_failed) and the record goes to the rescue file, never counted as
    spooled."""
    from probes import runner, spool

    db = tmp_path / "v.duckdb"
    sink = spool.SpoolSink(spool.spool_path(db, "R"), rescue_path=runner.rescue_path(db, "R"))
    os.close(sink._fd)
    sink._fd = os.open("/dev/full", os.O_WRONLY)
    sink.put(_record(0), None)
    assert sink.failed and sink.written == 0 and sink.not_stored == 1 and sink.rescued == 1
    assert sink.run_status("finished") == "store_failed"
    sink.close()


def test_databases_that_share_a_stem_never_share_spools(tmp_path):
    from probes import spool

    a, b = tmp_path / "v.duckdb", tmp_path / "v.db"
    spool.SpoolSink(spool.spool_path(a, "R1")).close()
    spool.SpoolSink(spool.spool_path(b, "R2")).close()
    assert [p.name for p in spool.spools(a)] == ["v.duckdb.spool-R1.jsonl"]
    assert [p.name for p in spool.spools(b)] == ["v.db.spool-R2.jsonl"]


def test_every_file_beside_the_database_uses_its_whole_name(tmp_path):
    """Lock, last run, spool and rescue: one rule (core.paths.beside_db), so
    ``v.duckdb`` and ``v.db`` share none of them."""
    from core.paths import beside_db
    from probes import runner, schedule, spool

    for db in (tmp_path / "v.duckdb", tmp_path / "v.db"):
        assert spool.RunLock(db).path == beside_db(db, ".run.lock") == tmp_path / f"{db.name}.run.lock"
        assert schedule.last_run_path(db) == tmp_path / f"{db.name}.last-run.json"
        assert spool.spool_path(db, "R1") == tmp_path / f"{db.name}.spool-R1.jsonl"
        assert runner.rescue_path(db, "R1") == tmp_path / f"{db.name}.rescue-R1.jsonl"
        assert runner.rescue_path(str(db), "R1") == runner.rescue_path(db, "R1")


def test_ctrl_c_between_the_fork_and_the_measuring_handler_interrupts_the_run(tmp_path, monkeypatch):
    """A Ctrl-C the measuring process gets before its own handler is set is
    kept for it: the run stops as interrupted (KeyboardInterrupt, exit 130
    in the CLI), not as a measuring process that died."""
    from probes import spool

    async def measure(progress, warn, runs):  # would measure for a minute
        await asyncio.sleep(60)
        return []

    monkeypatch.setattr(spool, "_early_interrupt", True)  # as if SIGINT came right after the fork
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(spool.measure_apart(measure, str(tmp_path / "v.duckdb")))
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------- the hand-over's file

def test_the_hand_over_is_read_only_from_its_own_memfd(monkeypatch):
    from probes import spool
    from probes.store import StoreError

    with open(os.devnull) as other:  # a descriptor that is no hand-over: refused, one line
        monkeypatch.setenv(spool.STAGE_ENV, str(other.fileno()))
        with pytest.raises(StoreError, match="not a hand-over"):
            spool.handed_back()
    assert spool.STAGE_ENV not in os.environ  # never inherited by the run's children
    monkeypatch.setenv(spool.STAGE_ENV, "12x")
    with pytest.raises(StoreError, match="not a hand-over"):
        spool.handed_back()

    def memfd(state):
        fd = os.memfd_create(spool._MEMFD_NAME, 0)
        spool._write_state(fd, state)
        return fd

    monkeypatch.setenv(spool.STAGE_ENV, str(memfd({"pid": os.getpid() + 1, "answer": {}})))
    with pytest.raises(StoreError, match="not this process's"):
        spool.handed_back()
    fd = memfd({"pid": os.getpid(), "answer": {"finals": {}}, "sigint_ignored": False})
    monkeypatch.setenv(spool.STAGE_ENV, str(fd))
    assert spool.handed_back()["answer"] == {"finals": {}}
    with pytest.raises(OSError):
        os.fstat(fd)  # read once, then closed


def test_a_store_that_failed_after_a_hand_over_still_names_its_runs(tmp_path):
    """An unattended run records which runs it was even when storing failed."""
    import base64
    import pickle

    from probes import spool
    from probes.runner import RunSummary
    from probes.store import StoreError

    ended = {"outcome": ("done", [RunSummary("R1", "finished", 3, 3)]), "started": ["R1"],
             "statuses": {"R1": "running"}, "status": 0}
    state = {"carry": {"ended": base64.b64encode(pickle.dumps(ended)).decode()},
             "answer": {"error": "writing to the database failed: disk full"}}
    runs: dict[str, str] = {}
    with pytest.raises(StoreError, match="disk full"):
        spool.stored(state, runs)
    assert runs == {"R1": "running"}
    state["answer"] = {"finals": {"R1": "finished"}}
    assert [s.status for s in spool.stored(state, runs)] == ["finished"] and runs == {"R1": "finished"}


async def test_ctrl_c_while_prepare_waits_for_a_busy_database_stops_the_run(tmp_path, home, http_server):
    """The database step of a hand-over waits up to a minute for a database
    another program holds; Ctrl-C there ends the run at once (exit 130), with
    nothing measured."""
    db = tmp_path / "v.duckdb"
    duckdb.connect(str(db)).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(60)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        args = ["run", "web", "--url", http_server.url("/"), "--db", str(db), "--yes", "--quiet", "--no-doh",
                "--probe-cc", "ZZ", "--probe-asn", "AS0"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=home, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 20
        while _image(proc.pid)[0][1:4] != ["-m", "probes.spool", "stage"]:
            assert time.monotonic() < deadline, "the run never reached its database step"
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # waiting for the database
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert time.monotonic() - started < 10  # not the minute's wait
        assert proc.returncode == 130, err.decode()
        assert "Traceback" not in err.decode() and "interrupted before a run started" in err.decode()
    finally:
        holder.kill()
        holder.wait()
    assert not list(tmp_path.glob("v.duckdb.spool-*"))
    con = duckdb.connect(str(db), read_only=True)
    try:  # the database was never opened by the run: not even migrated
        assert con.execute("SELECT count(*) FROM information_schema.tables").fetchone()[0] == 0
    finally:
        con.close()
