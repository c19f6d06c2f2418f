"""The bulk writer (probes/store.py: arrow_tables, insert_tables, insert_each)
and the import's worker processes (probes/ooni_import.py): the same rows, the
same summary, whichever road the records take."""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import duckdb
import pytest

from probes import flatten, store
from probes.ooni_import import OoniImportError, import_ooni, record_from_ooni
from shared import shared_path
from test_ooni_import import _qa_lines, _write_gz

pytestmark = pytest.mark.shared

TABLES = flatten.FLATTENED_TABLES


def _rows(db) -> dict[str, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}
    finally:
        con.close()


def _records(count: int) -> list:
    """QA measurements as records, each with an id of its own."""
    return [(record_from_ooni(d) | {"measurement_id": f"m{n}"}, None) for n, d in enumerate(_qa_lines()[:count])]


def _layout(tmp_path):
    """OONI's published layout with a corrupt line, a truncated .gz, another
    test and a plain .json (tests/test_ooni_import.py's case)."""
    docs = _qa_lines(copies=3)
    day = tmp_path / "raw" / "20240102"
    _write_gz(day / "00" / "IR" / "webconnectivity" / "a.jsonl.gz", docs[:50], corrupt_line=7)
    truncated = day / "01" / "IR" / "webconnectivity" / "b.jsonl.gz"
    _write_gz(truncated, docs[50:150] + docs[:10])  # ten measurements twice
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 3 // 4])
    _write_gz(day / "00" / "IR" / "telegram" / "t.jsonl.gz", [{"test_name": "telegram", "test_keys": {}}] * 4)
    plain = day / "02" / "IR" / "webconnectivity" / "one.json"
    plain.parent.mkdir(parents=True)
    plain.write_text(json.dumps(docs[0] | {"report_id": "plain"}))
    return tmp_path / "raw"


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_the_reader_process_imports_what_the_single_process_does(tmp_path, batch_size):
    raw = _layout(tmp_path)
    results = {}
    for worker in (False, True):
        db = tmp_path / f"{worker}.duckdb"
        con = store.connect(db)
        try:
            first = import_ooni(con, [raw], batch_size=batch_size, worker=worker).as_dict()
            again = import_ooni(con, [raw], batch_size=batch_size, worker=worker).as_dict()
        finally:
            con.close()
        results[worker] = (first, again, _rows(db))
    assert results[True] == results[False]
    first, again, rows = results[True]
    assert first["partial"] and first["bad"] == 2 and first["imported"] > 50
    assert again["imported"] == 0 and again["duplicates"] == first["imported"] + first["duplicates"]
    assert len(rows["measurements"]) == first["imported"]


def test_the_reader_process_reports_file_and_line_of_what_cannot_be_flattened(tmp_path, monkeypatch):
    docs = _qa_lines()[:20]
    docs[5] = docs[5] | {"report_id": "poison"}
    path = tmp_path / "x.jsonl.gz"
    _write_gz(path, docs)
    real = flatten.flatten

    def poisoned(record, category=None):
        if record.get("report_id") == "poison":
            raise ValueError("poisoned")
        return real(record, category)

    monkeypatch.setattr(flatten, "flatten", poisoned)  # the in-process road
    con = store.connect(tmp_path / "v.duckdb")
    try:
        summary = import_ooni(con, [path], worker=False).as_dict()
    finally:
        con.close()
    assert summary["imported"] + summary["duplicates"] == 19 and summary["bad"] == 1, summary
    assert summary["errors"] == [{"file": str(path), "line": 6, "error": "not stored: poisoned"}]


def test_insert_tables_skips_stored_measurements_with_their_rows(tmp_path):
    records = _records(30)
    con = store.connect(tmp_path / "a.duckdb")
    try:
        assert store.insert_tables(con, store.arrow_tables(records[::2])) == 15
        assert store.insert_tables(con, store.arrow_tables(records)) == 15  # a batch half stored already
        assert store.insert_tables(con, store.arrow_tables(records)) == 0
    finally:
        con.close()
    con = store.connect(tmp_path / "b.duckdb")
    try:
        store.write_records(con, records)  # the probe's VALUES road, all at once
    finally:
        con.close()
    assert _rows(tmp_path / "a.duckdb") == _rows(tmp_path / "b.duckdb")


def test_insert_each_stores_all_but_the_measurement_the_database_refuses(tmp_path, monkeypatch):
    records = _records(10)
    tables = store.arrow_tables(records)
    ids = [r["measurement_id"] for r, _ in records]
    real = store._insert_arrow

    def refusing(con, table, data, where="", returning=False):  # the database refuses ids[3], alone or not
        if table == "measurements" and ids[3] in data.column("measurement_id").to_pylist():
            raise duckdb.ConversionError("refused")
        return real(con, table, data, where, returning)

    monkeypatch.setattr(store, "_insert_arrow", refusing)
    refused = []
    con = store.connect(tmp_path / "a.duckdb")
    try:
        stored = store.insert_each(con, tables, ids, lambda mid, exc: refused.append(mid))
        got = {m for (m,) in con.execute("SELECT measurement_id FROM measurements").fetchall()}
        rows = sum(con.execute(f"SELECT count(*) FROM {t} WHERE measurement_id = ?", [ids[3]]).fetchone()[0]
                   for t in TABLES)
    finally:
        con.close()
    assert refused == [ids[3]] and stored == 9 and got == set(ids) - {ids[3]} and rows == 0


def test_bulk_gc_and_memory_limit_restore_what_they_change(tmp_path):
    con = store.connect(tmp_path / "a.duckdb")
    try:
        def limit() -> float:
            return store._bytes(con.execute("SELECT current_setting('memory_limit')").fetchone()[0])

        before = limit()
        with store.memory_limit(con, "100MB"):
            assert limit() == pytest.approx(100e6, rel=0.01)
        assert limit() == pytest.approx(before, rel=0.01)  # DuckDB shows it rounded to 0.1 GiB
        con.execute("SET memory_limit = '50MB'")
        with store.memory_limit(con, "100MB"):  # a lower limit of the caller's stays
            assert limit() == pytest.approx(50e6, rel=0.01)
    finally:
        con.close()
    assert gc.isenabled()
    with store.bulk_gc() as collect:
        assert not gc.isenabled()
        collect()
    assert gc.isenabled() and not gc.get_freeze_count()


def test_the_shared_folder_imports_alike_in_both_roads(tmp_path):
    folder = shared_path("data", "ooni")
    results = []
    for worker in (False, True):
        db = tmp_path / f"{worker}.duckdb"
        con = store.connect(db)
        try:
            summary = import_ooni(con, [folder], worker=worker).as_dict()
        finally:
            con.close()
        results.append((summary, _rows(db)))
    assert results[0] == results[1]


def _spawned(parent: int) -> set[int]:
    """``parent``'s children that multiprocessing spawned (its resource
    tracker left out)."""
    pids = set()
    for task in Path(f"/proc/{parent}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread or the process ended
            continue
        for pid in children:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                pids.add(int(pid))
    return pids


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_dies_ends_the_import_with_one_line_and_keeps_what_was_stored(tmp_path, workers):
    path = tmp_path / "big.jsonl.gz"
    _write_gz(path, _qa_lines(copies=40))
    killed = []
    before = _spawned(os.getpid())  # another test's, if any: not this import's

    def progress(done: int, total: int) -> None:
        if not killed and done > total // 3:  # some batches stored, more to come
            killed.extend(_spawned(os.getpid()) - before)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    con = store.connect(tmp_path / "v.duckdb")
    try:
        with pytest.raises(OoniImportError, match=r"^a worker process of the import died \(exit code -9\)$"):
            import_ooni(con, [path], batch_size=7, worker=True, workers=workers, on_progress=progress)
        stored = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    finally:
        con.close()
    assert len(killed) == workers
    assert 0 < stored < 2000  # what was written before stays
    assert not _alive(_spawned(os.getpid()) - before)  # and no worker is left behind


def test_ctrl_c_stops_an_import_at_once_and_a_second_import_adds_the_rest(tmp_path):
    """DuckDB turns a Ctrl-C during a query into ``RuntimeError: Query
    interrupted`` (or its InterruptException); caught as a batch's failure
    it made the import go on, a record a transaction. Now the import stops
    (exit 130), keeps what it wrote, and importing the file again stores
    the rest."""
    import subprocess
    import sys
    import time

    docs = _qa_lines(copies=300)  # 15,000 lines: seconds of work
    distinct = len({record_from_ooni(d)["measurement_id"] for d in docs})  # (some QA ones share an id)
    path = tmp_path / "big.jsonl.gz"
    _write_gz(path, docs)
    db = tmp_path / "v.duckdb"
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "cli.main", "import", "ooni", "-q", str(path), "--db", str(db)]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def written() -> int:  # the database and its WAL: a batch of 1,000 is ~7 MB of record text
            return sum(p.stat().st_size for p in (db, Path(str(db) + ".wal")) if p.exists())

        deadline = time.monotonic() + 60
        while written() < 4_000_000 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until the first batches are committed
        assert proc.poll() is None, "the import ended before it could be interrupted"
        workers = _spawned(proc.pid)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and time.monotonic() - sent < 10, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "aborted"
    assert workers and not _alive(workers)  # the workers ended with it
    con = duckdb.connect(str(db), read_only=True)
    try:
        kept = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    finally:
        con.close()
    assert 0 < kept < distinct
    again = subprocess.run(command[:-2] + ["--json", "--db", str(db)], cwd=root, capture_output=True, text=True,
                           timeout=300)
    summary = json.loads(again.stdout)
    assert again.returncode == 0 and summary["imported"] == distinct - kept, again.stderr
    assert summary["imported"] + summary["duplicates"] == len(docs)


def test_a_file_the_reader_chokes_on_is_reported_and_the_others_imported(tmp_path):
    """A .jsonc whose comment names no measurement after explorer's address,
    with test keys whose request is not an object, imports; a file that
    cannot be read (/proc/self/mem: EIO at offset 0) is an error with its
    name, not a record; the same in both roads."""
    docs = _qa_lines()[:5]
    _write_gz(tmp_path / "a.jsonl.gz", docs)
    keys = dict(docs[0]["test_keys"])
    keys["requests"] = [{"request": "GET /"}] + list(keys.get("requests") or [])
    (tmp_path / "b.jsonc").write_text("// see https://explorer.ooni.org/m/\n" + json.dumps(keys))
    paths = [tmp_path / "a.jsonl.gz", "/proc/self/mem", tmp_path / "b.jsonc"]
    read, stored = {}, {}
    for worker in (False, True):
        con = store.connect(tmp_path / f"{worker}.duckdb")
        try:
            read[worker] = import_ooni(con, paths, worker=worker).as_dict()
            stored[worker] = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
        finally:
            con.close()
    assert read[True] == read[False] and stored[True] == stored[False] == 6
    first = read[False]
    assert first["files"] == 3 and first["records"] == 6 and first["imported"] == 6, first
    assert first["errors"] == [{"file": "/proc/self/mem", "line": 0, "error": "cannot read: Input/output error"}]


def test_a_statement_that_fails_in_a_transaction_raises_its_own_error(tmp_path):
    """The unregister after a failed statement fails too in the aborted
    transaction; it must not hide the statement's error (what an import
    reports for a measurement the database refuses)."""
    import pyarrow as pa

    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE dns_answers (measurement_id VARCHAR, ttl INTEGER CHECK (ttl < 5))")
        con.execute("BEGIN")
        with pytest.raises(duckdb.ConstraintException, match="CHECK constraint"):
            store._insert_arrow(con, "dns_answers", pa.table({"measurement_id": ["m"], "ttl": [9]}))
        con.execute("ROLLBACK")
        store._insert_arrow(con, "dns_answers", pa.table({"measurement_id": ["m"], "ttl": [1]}))  # the name is free again
        assert con.execute("SELECT count(*) FROM dns_answers").fetchone()[0] == 1
    finally:
        con.close()
