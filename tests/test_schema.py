"""One schema definition; a record that cannot be stored fails alone; rescue
files import back; the run's status says what happened to its data; schema
versions are checked (issues 9, 10 items 4-6, 11)."""

from __future__ import annotations

import asyncio
import json

import duckdb
import pytest

from core.errors import VantageError
from probes import records as R
from probes import schema, store
from probes.flatten import RECORD_JSON_CAP, flatten
from probes.runner import Experiment, Location, finish_run, run_inputs, start_run
from probes.context import ProbeContext
from probes.timeouts import Timeouts
from shared import shared_path
from test_store import _record

# The full schema as version 1 shipped it (runs without `rescued`): what an
# older Vantage left on a volunteer's disk.
V1_RUNS = """
CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP DEFAULT current_timestamp);
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, test_name VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, status VARCHAR,
                   inputs_total INTEGER, options JSON, probe_cc VARCHAR, probe_asn VARCHAR, software_version VARCHAR);
INSERT INTO schema_migrations (version, name) VALUES (1, 'initial schema');
INSERT INTO runs (run_id, status) VALUES ('OLD', 'finished');
"""


def _columns(con, table):
    return con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                       "ORDER BY ordinal_position", [table]).fetchall()


def _rich_record(**extra):
    """A record with every kind of entry, probe and control side."""
    body = "<title>Hello</title>" + "x" * 100
    record = _record(
        tls_handshakes=[R.tls_handshake(address="[2001:db8::1]:443", server_name="a.example", failure=None, t0=0.1, t=0.2,
                                        transaction_id=2, tls_version="TLSv1.3", cipher_suite="TLS_AES_128_GCM_SHA256")],
        requests=[{"request": {"url": "https://a.example/", "method": "GET", "headers": {}},
                   "response": {"code": 200, "headers": {"Server": "x"}, "body": body, "body_is_truncated": False},
                   "failure": None, "t0": 0.3, "t": 0.4, "transaction_id": 3, "x_redirect_index": 0, "x_address": "198.18.100.1:443"}],
        network_events=[R.network_event(operation="bytes_received", t=0.35, transaction_id=3, num_bytes=100)],
        x_throughput=[{"side": "probe", "variant": "target", "attempt": 0, "ip": "198.18.100.1", "server_name": "a.example",
                       "failure": None, "bytes": 1000, "seconds": 1.0, "kbit_per_s": 8.0}],
        **extra,
    )
    control = record["test_keys"]["control"]
    control["tls_handshake"] = {"198.18.100.1:443": {"status": True, "failure": None, "server_name": "a.example", "x_cert_valid": True}}
    control["x_doh"] = [{"resolver_address": "https://doh.example/dns-query", "hostname": "a.example", "query_type": "A",
                         "answers": [{"answer_type": "A", "ipv4": "198.18.100.1", "ttl": 60}], "failure": None, "rcode": "NOERROR"}]
    control["x_throughput"] = [{"variant": "helper", "attempt": 0, "bytes": 1, "seconds": 1.0, "kbit_per_s": 1.0}]
    return record


# --- one schema definition ----------------------------------------------------


def test_parsed_schema_is_what_duckdb_creates():
    con = store.connect(":memory:")
    for table, columns in schema.TABLES.items():
        assert [(c.name, c.type) for c in columns] == _columns(con, table), table
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    assert set(schema.TABLES) <= tables


def test_every_flattened_key_is_a_column():
    records = [_rich_record(), _record(control=None)]
    for path in sorted(shared_path("data", "ooni").rglob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("test_name") == "web_connectivity":
            from probes.ooni_import import record_from_ooni

            records.append(record_from_ooni(doc))
    seen: dict[str, set] = {}
    for record in records:
        for table, rows in flatten(record).items():
            assert table in schema.TABLE_COLUMNS, table
            for row in rows:
                assert set(row) <= set(schema.TABLE_COLUMNS[table]), (table, set(row) - set(schema.TABLE_COLUMNS[table]))
                seen.setdefault(table, set()).update(row)
    # The rich record reaches every observation table.
    assert set(seen) == {"measurements", "dns_answers", "tcp_connects", "tls_handshakes", "http_transactions",
                         "network_events", "throughput_samples", "ip_info"}


def test_rows_are_written_by_name_in_schema_order(tmp_path):
    con = store.connect(tmp_path / "v.duckdb")
    store.write_all(con, [(_rich_record(), "NEWS")])
    row = con.execute("SELECT side, ip, port, server_name, tls_version FROM tls_handshakes WHERE side = 'probe'").fetchone()
    assert row == ("probe", "2001:db8::1", 443, "a.example", "TLSv1.3")
    assert con.execute("SELECT variant, kbit_per_s FROM throughput_samples WHERE side = 'control'").fetchone() == ("helper", 1.0)


# --- a malformed field degrades that field, never the measurement -----------------


def test_bad_base64_body_of_the_real_ooni_measurement_is_stored(tmp_path):
    from probes.ooni_import import record_from_ooni

    path = shared_path("data", "ooni", "backend-fastpath", "web_connectivity_b64_incorrect.json")
    if not path.exists():
        pytest.skip("shared OONI data absent")
    bad = record_from_ooni(json.loads(path.read_text()))
    others = [(_record(url=f"https://s{i}.example/"), None) for i in range(3)]
    con = store.connect(tmp_path / "v.duckdb")
    store.write_all(con, others[:1] + [(bad, None)] + others[1:])  # in one batch with others
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 4
    body = con.execute("SELECT body FROM http_transactions WHERE measurement_id = ? AND side = 'probe'",
                       [bad["measurement_id"]]).fetchone()[0]
    assert body == "hi"  # 'aGk' lacks its padding


def test_malformed_fields_become_null_not_a_lost_batch(tmp_path):
    record = _record(
        tcp_connect=["not an object", {"ip": "198.18.100.1", "port": "https", "status": "weird", "t0": "soon", "t": 0.2}],
        queries=[{"engine": "udp", "hostname": "a.example", "answers": [{"answer_type": "A", "ipv4": "198.18.100.1", "ttl": "long"}],
                  "x_response_index": 2**40, "t0": 0.0, "t": 0.1}],
        tls_handshakes=[{"address": 12345, "failure": None}],
        requests=[{"request": "GET /", "response": {"code": "200 OK", "body": {"format": "base64", "data": 7}}, "x_redirect_index": "x"}],
        network_events=[None, {"operation": "bytes_received", "num_bytes": "many", "t": 0.1}],
    )
    record["measurement_start_time"] = 12
    record["input"] = "http://[::1/"  # not a URL urlsplit accepts
    con = store.connect(tmp_path / "v.duckdb")
    store.write_all(con, [(record, None), (_record(url="https://fine.example/"), None)])
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 2
    mid = [record["measurement_id"]]
    assert con.execute("SELECT ip, port, success, t0 FROM tcp_connects WHERE side = 'probe' AND measurement_id = ?", mid).fetchall() \
        == [("198.18.100.1", None, False, None)]
    assert con.execute("SELECT answer, ttl, response_index FROM dns_answers WHERE side = 'probe' AND measurement_id = ?", mid).fetchall() \
        == [("198.18.100.1", None, None)]
    assert con.execute("SELECT ip, port FROM tls_handshakes WHERE side = 'probe' AND measurement_id = ?", mid).fetchall() == [(None, None)]
    assert con.execute("SELECT status_code, redirect_index, body FROM http_transactions WHERE side = 'probe' AND measurement_id = ?",
                       mid).fetchall() == [(None, None, "")]
    assert con.execute("SELECT num_bytes FROM network_events WHERE measurement_id = ?", mid).fetchall() == [(None,)]
    assert con.execute("SELECT domain, start_time FROM measurements WHERE measurement_id = ?", mid).fetchone() == (None, None)


# --- bounds: a huge record is stored in the probe's 32 MB --------------------------


def _flood(record, count=61_000):
    """The deflate stream of empty blocks: one bytes_received event per read."""
    record["test_keys"]["network_events"] = [
        R.network_event(operation="bytes_received", t=0.5 + i * 0.0001, transaction_id=3, num_bytes=i % 2, address="198.18.100.1:80")
        for i in range(count)
    ]
    return record


def test_a_61000_event_record_is_stored_in_the_probes_memory_limit(tmp_path):
    con = store.connect(tmp_path / "v.duckdb", **store.PROBE_LIMITS)
    record = _flood(_record())
    store.write_all(con, [(record, None), (_record(url="https://next.example/"), None)])
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 2
    count, total, last = con.execute("SELECT count(*), sum(num_bytes), max(t) FROM network_events").fetchone()
    # Bounded, and what the slow-transfer rule reads is exact: bytes and the last arrival.
    assert count <= 64 + 1 and total == 61_000 // 2 and last == pytest.approx(0.5 + 60_999 * 0.0001)
    stored = con.execute("SELECT record FROM measurements WHERE measurement_id = ?", [record["measurement_id"]]).fetchone()[0]
    assert len(stored) < RECORD_JSON_CAP
    assert json.loads(stored)["test_keys"]["x_store_caps"]["network_events_merged"] == 61_000 - 64
    assert len(record["test_keys"]["network_events"]) == 61_000  # the caller's record is untouched


def test_a_record_of_many_big_hops_is_stored_in_the_probes_memory_limit(tmp_path):
    body = "<title>x</title>" + "z" * 70_000
    headers = {f"X-H{j}": "v" * 1000 for j in range(60)}
    hops = [{"request": {"url": f"https://a.example/{i}", "method": "GET"},
             "response": {"code": 302, "headers": headers, "body": body}, "x_redirect_index": i} for i in range(1500)]
    record = _record(requests=hops)
    con = store.connect(tmp_path / "v.duckdb", **store.PROBE_LIMITS)
    store.write_all(con, [(record, None)])
    rows, text = con.execute("SELECT count(*), sum(coalesce(length(body), 0) + coalesce(length(headers::VARCHAR), 0)) "
                             "FROM http_transactions WHERE side = 'probe'").fetchone()
    assert rows == 1024 and text <= 4 * 1024 * 1024
    # Every hop keeps what says what it was: the status, the length and hash of its body.
    assert con.execute("SELECT count(*) FROM http_transactions WHERE side = 'probe' AND status_code = 302 "
                       "AND body_length = ? AND body_sha256 IS NOT NULL", [len(body)]).fetchone()[0] == 1024
    caps = json.loads(con.execute("SELECT record FROM measurements").fetchone()[0])["test_keys"]["x_store_caps"]
    assert caps["rows_dropped"] == {"http_transactions": 1500 - 1024} and caps["text_dropped"] > 0
    # The control's row is kept whole: the analysis compares with it.
    assert con.execute("SELECT failure, headers FROM http_transactions WHERE side = 'control'").fetchone() == ("connection_reset", "{}")


def test_stored_record_json_is_bounded(tmp_path):
    record = _record(x_blob=["y" * 60_000] * 40)  # 2.4 MB of one odd key
    con = store.connect(tmp_path / "v.duckdb", **store.PROBE_LIMITS)
    store.write_all(con, [(record, None)])
    stored = json.loads(con.execute("SELECT record FROM measurements").fetchone()[0])
    assert stored["test_keys"]["x_blob"] is None and "x_blob" in stored["test_keys"]["x_store_caps"]["keys_dropped"]
    assert stored["test_keys"]["queries"]  # the rest of the record is kept


# --- a record that cannot be stored fails alone ------------------------------------


def _refuse(monkeypatch, bad_ids):
    """The database refuses any batch holding one of ``bad_ids`` (as DuckDB
    did with a 7.2 MB record in 32 MB)."""
    real = store.insert_rows

    def insert_rows(con, table, rows):
        if table == "measurements" and any(r.get("measurement_id") in bad_ids for r in rows):
            raise duckdb.OutOfMemoryException("Out of Memory Error: failed to allocate data of size 32.0 MiB")
        return real(con, table, rows)

    monkeypatch.setattr(store, "insert_rows", insert_rows)


def test_one_unstorable_record_fails_alone(tmp_path, monkeypatch):
    con = store.connect(tmp_path / "v.duckdb")
    rescue = tmp_path / "rescue.jsonl"
    records = [_record(url=f"https://s{i}.example/") for i in range(10)]
    _refuse(monkeypatch, {records[3]["measurement_id"]})
    sink = store.Sink(con, batch_size=5, rescue_path=rescue)
    for r in records:
        sink.put(r)
    sink.close()  # no error: the database works
    assert not sink.failed and sink.written == 9 and sink.rescued == 1
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 9
    [line] = rescue.read_text().splitlines()
    saved = json.loads(line)
    assert saved["record"]["measurement_id"] == records[3]["measurement_id"] and "Out of Memory" in saved["error"]
    assert sink.run_status("finished") == "partial"


def _spec(measure):
    return Experiment("fake_test", "0", measure, lambda: {"steps": [], "network_events": []}, lambda keys: "done")


async def test_a_hostile_site_does_not_stop_the_run(tmp_path):
    """Issue 10 item 4, store side: the 61,000-event record is stored (bounded)
    in the probe's 32 MB, every later URL is measured and stored, and the run
    is finished."""
    async def measure(url, ctx, keys, clock):
        keys["steps"].append(url)
        if "hostile" in url:
            _flood({"test_keys": keys})

    con = store.connect(tmp_path / "v.duckdb", **store.PROBE_LIMITS)
    inputs = [("https://hostile.example/", None)] + [(f"https://s{i}.example/", None) for i in range(20)]
    test = _spec(measure)
    start_run(con, "R", test, inputs, {}, Location())
    sink = store.Sink(con, rescue_path=tmp_path / "rescue.jsonl")
    summary = await run_inputs(inputs, test=test, ctx=ProbeContext(timeouts=Timeouts(measurement=5.0)), sink=sink,
                               run_id="R", location=Location(), concurrency=4)
    sink.close()
    assert finish_run(con, "R", summary.status, sink=sink) == "finished"
    assert con.execute("SELECT count(*) FROM measurements WHERE run_id = 'R'").fetchone()[0] == 21
    assert not (tmp_path / "rescue.jsonl").exists()


# --- the run's status says what happened to its data --------------------------------


def test_a_run_whose_last_write_failed_is_not_finished(tmp_path):
    con = store.connect(tmp_path / "v.duckdb")
    test = _spec(None)
    start_run(con, "R", test, [("https://a.example/", None)], {}, Location())
    sink = store.Sink(con, rescue_path=tmp_path / "rescue.jsonl")
    closed = duckdb.connect(":memory:")
    closed.close()
    sink.con = closed  # the final flush fails, after the runner said "finished"
    sink.put(_record())
    with pytest.raises(store.StoreError):
        sink.close()
    assert finish_run(con, "R", "finished", sink=sink) == "store_failed"
    assert con.execute("SELECT status, rescued FROM runs WHERE run_id = 'R'").fetchone() == ("store_failed", 1)


def test_a_run_with_rescued_records_is_partial_until_they_are_imported(tmp_path, monkeypatch):
    con = store.connect(tmp_path / "v.duckdb")
    records = [_record(url=f"https://s{i}.example/", run="R") for i in range(6)]
    start_run(con, "R", _spec(None), [(r["input"], None) for r in records], {}, Location())
    rescue = tmp_path / "rescue.jsonl"
    bad = {records[1]["measurement_id"], records[4]["measurement_id"]}
    _refuse(monkeypatch, bad)
    sink = store.Sink(con, batch_size=3, rescue_path=rescue)
    for r in records:
        sink.put(r, "NEWS")
    sink.close()
    assert finish_run(con, "R", "finished", sink=sink) == "partial"
    assert con.execute("SELECT status, rescued FROM runs WHERE run_id = 'R'").fetchone() == ("partial", 2)

    monkeypatch.undo()  # the database accepts them now (say, with more memory)
    with rescue.open("a") as fh:
        fh.write("not json\n{\"record\": 3}\n\n")
    assert store.import_rescue(con, rescue) == (2, 2)
    assert con.execute("SELECT count(*) FROM measurements WHERE run_id = 'R'").fetchone()[0] == 6
    assert con.execute("SELECT category_code FROM measurements WHERE measurement_id = ?", [records[1]["measurement_id"]]).fetchone()[0] == "NEWS"
    assert con.execute("SELECT status, rescued FROM runs WHERE run_id = 'R'").fetchone() == ("finished", 0)
    # Idempotent: a second import stores nothing twice.
    assert store.import_rescue(con, rescue) == (0, 4)
    assert con.execute("SELECT count(*) FROM dns_answers WHERE measurement_id = ?", [records[1]["measurement_id"]]).fetchone()[0] == 4  # 2 probe, 2 control: once


def test_import_rescue_of_a_missing_file_is_one_line(tmp_path):
    con = store.connect(":memory:")
    with pytest.raises(store.StoreError, match="cannot read the rescue file"):
        store.import_rescue(con, tmp_path / "nope.jsonl")


# --- schema versions -----------------------------------------------------------------


def test_a_newer_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "v.duckdb"
    con = store.connect(path)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, 'from the future')", [store.SCHEMA_VERSION + 1])
    con.close()
    for read_only in (False, True):
        with pytest.raises(store.StoreError) as caught:
            store.connect(path, read_only=read_only)
        assert isinstance(caught.value, VantageError)
        message = str(caught.value)
        assert "\n" not in message and f"schema version {store.SCHEMA_VERSION + 1}" in message and "newer" in message
    # Nothing was written to it.
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == store.SCHEMA_VERSION + 1


@pytest.mark.parametrize("read_only", [False, True])
def test_an_older_schema_is_migrated(tmp_path, read_only):
    path = tmp_path / "old.duckdb"
    old = duckdb.connect(str(path))
    old.execute(V1_RUNS)
    old.execute(schema.SCHEMA_SQL)  # every other table as version 1 had it
    old.close()
    assert [c for c, _ in _columns(duckdb.connect(":memory:").execute(V1_RUNS), "runs")][-1] == "software_version"
    con = store.connect(path, read_only=read_only)
    assert con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(v,) for v, _, _ in schema.MIGRATIONS]
    fresh = store.connect(":memory:")
    for table in schema.TABLES:
        assert _columns(con, table) == _columns(fresh, table), table
    assert con.execute("SELECT status, rescued FROM runs WHERE run_id = 'OLD'").fetchone() == ("finished", 0)


def test_migrations_are_numbered_in_order():
    numbers = [number for number, _, _ in schema.MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1)) and store.SCHEMA_VERSION == numbers[-1]


def test_results_import_rescue_command_stores_a_rescue_file_once(tmp_path):
    """Issue 10: nothing imported the rescue file; `vantage results import-rescue` does, idempotently."""
    import json
    import subprocess
    import sys

    db = tmp_path / "v.duckdb"
    store.connect(db).close()
    rescue = tmp_path / "v.rescue-R.jsonl"
    records = [_record(url=f"https://r{i}.example/", run="R") for i in range(3)]
    rescue.write_text("".join(json.dumps({"category_code": "NEWS", "record": r}) + "\n" for r in records))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "cli.main", "results", "import-rescue", str(rescue), "--db", str(db), *args],
                              capture_output=True, text=True, timeout=60)

    first = run("--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) | {"file": None} == {"file": None, "imported": 3, "skipped": 0}
    again = run()
    assert again.returncode == 0 and again.stdout.startswith("0 measurements stored") and "3 skipped" in again.stdout
    con = store.connect(db, read_only=True)
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 3
    missing = subprocess.run([sys.executable, "-m", "cli.main", "results", "import-rescue", str(tmp_path / "none.jsonl"),
                              "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["analyze"], ["results", "list"]])
def test_commands_refuse_a_newer_schema_and_create_nothing_for_a_typo(tmp_path, command):
    """Issue 10: a newer database was opened and written to, and `analyze` failed with an internal error."""
    import subprocess
    import sys

    path = tmp_path / "v.duckdb"
    con = store.connect(path)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, 'from the future')", [store.SCHEMA_VERSION + 1])
    con.close()
    newer = subprocess.run([sys.executable, "-m", "cli.main", *command, "--db", str(path)], capture_output=True, text=True,
                           timeout=120)
    assert newer.returncode == 2 and len(newer.stderr.strip().splitlines()) == 1 and "newer" in newer.stderr
    typo = tmp_path / "typo" / "x.duckdb"
    missing = subprocess.run([sys.executable, "-m", "cli.main", *command, "--db", str(typo)], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and str(typo) in missing.stderr
    assert not typo.parent.exists()
