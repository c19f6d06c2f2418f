"""The sink and the flattener: records in, documented rows out, nothing lost."""

from __future__ import annotations

import json
import pytest

from probes import records as R
from probes import store
from core.net import split_endpoint
from probes.flatten import flatten
from probes.schema import TABLE_COLUMNS


def _record(url="https://a.example/", run="RUN1", **keys):
    m = R.Measurement("web_connectivity", "0.1.0", url, run)
    m.test_keys = {
        "queries": [
            R.dns_query(engine="udp", resolver="198.18.53.8:53", hostname="a.example", query_type="A",
                        answers=[R.dns_answer("A", "198.18.100.1", 60)], failure=None, rcode="NOERROR",
                        t0=0.0, t=0.01, transaction_id=1),
            R.dns_query(engine="udp", resolver="198.18.53.8:53", hostname="a.example", query_type="A",
                        answers=[R.dns_answer("A", "198.18.100.2", 60)], failure=None, rcode="NOERROR",
                        t0=0.0, t=0.2, transaction_id=1, response_index=1),
        ],
        "tcp_connect": [R.tcp_connect(ip="198.18.100.1", port=443, failure="connection_refused", t0=0.1, t=0.2, transaction_id=2)],
        "tls_handshakes": [],
        "requests": [],
        "network_events": [],
        "control": {"dns": {"failure": None, "addrs": ["198.18.100.1", "2001:db8::1"]},
                    "tcp_connect": {"198.18.100.1:443": {"status": True, "failure": None},
                                    "[2001:db8::1]:443": {"status": False, "failure": "generic_timeout_error"}},
                    "http_request": {"status_code": -1, "body_length": -1, "failure": "connection_reset", "title": "", "headers": {}}},
        "control_failure": None,
        **keys,
    }
    return m.to_dict()


def _full(table, row):
    """A flattened row with every column of the table (schema order)."""
    return tuple(row.get(c) for c in TABLE_COLUMNS[table])


def test_flatten_puts_late_answers_and_control_in_their_tables():
    rows = flatten(_record(), "NEWS")
    dns = rows["dns_answers"]
    assert [(r["side"], r["response_index"], r["answer"]) for r in dns if r["side"] == "probe"] == [("probe", 0, "198.18.100.1"), ("probe", 1, "198.18.100.2")]
    control = [r for r in dns if r["side"] == "control"]
    assert {(r["answer_type"], r["answer"]) for r in control} == {("A", "198.18.100.1"), ("AAAA", "2001:db8::1")}
    tcp = {(r["side"], r["ip"], r["success"], r["failure"]) for r in rows["tcp_connects"]}
    assert ("probe", "198.18.100.1", False, "connection_refused") in tcp
    assert ("control", "2001:db8::1", False, "generic_timeout_error") in tcp
    http = [_full("http_transactions", r) for r in rows["http_transactions"]]
    # OONI's -1 sentinels become NULL, the failure is kept.
    assert http == [(http[0][0], "control", None, 0, None, "GET", None, "connection_reset", None, "{}", "", None, None, None, None, None, None, None)]
    m = rows["measurements"][0]
    assert (m["domain"], m["scheme"], m["port"], m["category_code"], m["control_failure"]) == ("a.example", "https", 443, "NEWS", None)


def test_missing_control_is_recorded_as_such():
    record = _record(control=None, control_failure=None)
    assert flatten(record)["measurements"][0]["control_failure"] == "no_control"


def test_split_endpoint_handles_ipv6():
    assert split_endpoint("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert split_endpoint("198.18.0.1:80") == ("198.18.0.1", 80)


def test_sink_writes_batches_and_skips_duplicates(tmp_path):
    con = store.connect(tmp_path / "v.duckdb")
    sink = store.Sink(con, batch_size=3)
    records = [_record(url=f"https://s{i}.example/") for i in range(10)]
    for r in records:
        sink.put(r, "NEWS")
    sink.put(records[0], "NEWS")  # the same measurement twice is stored once
    sink.close()
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 10
    assert con.execute("SELECT count(*) FROM dns_answers WHERE side = 'probe'").fetchone()[0] == 20
    stored = json.loads(con.execute("SELECT record FROM measurements LIMIT 1").fetchone()[0])
    assert stored["test_keys"]["queries"][0]["engine"] == "udp"


def test_reopening_migrates_once(tmp_path):
    path = tmp_path / "v.duckdb"
    store.connect(path).close()
    con = store.connect(path)
    # One row per migration, each applied once.
    assert con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(v,) for v, _, _ in store.MIGRATIONS]


def test_unwritable_location_is_a_clear_error():
    # /proc refuses new directories even for root, like a read-only mount.
    with pytest.raises(store.StoreError, match="cannot create the directory"):
        store.connect("/proc/vantage-test/v.duckdb")


def test_path_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(store.StoreError, match="cannot create the directory"):
        store.connect(blocker / "sub" / "v.duckdb")


def test_ids_sort_by_time():
    a = R.new_id(1_700_000_000.0)
    b = R.new_id(1_700_000_000.5)
    assert len(a) == 26 and a < b


def test_bodies_are_stored_once_in_http_transactions(tmp_path):
    page = "<title>Hi</title>" + "x" * 1000
    record = _record(requests=[{"request": {"url": "https://a.example/", "method": "GET", "headers": {}},
                                "response": {"code": 200, "headers": {}, "body": page, "body_is_truncated": False},
                                "failure": None, "t0": 0.3, "t": 0.4, "transaction_id": 3, "x_redirect_index": 0}])
    con = store.connect(tmp_path / "v.duckdb")
    store.write_all(con, [(record, None)])
    stored = json.loads(con.execute("SELECT record FROM measurements").fetchone()[0])
    response = stored["test_keys"]["requests"][0]["response"]
    assert "body" not in response and response["x_body_in"] == "http_transactions.body"
    body, title, length = con.execute("SELECT body, title, body_length FROM http_transactions WHERE side = 'probe'").fetchone()
    assert (body, title, length) == (page, "Hi", len(page))
    assert record["test_keys"]["requests"][0]["response"]["body"] == page  # the caller's record is untouched


def test_a_failing_database_sends_records_to_the_rescue_file(tmp_path):
    import duckdb as _duckdb

    con = store.connect(tmp_path / "v.duckdb")
    rescue = tmp_path / "rescue.jsonl"
    sink = store.Sink(con, batch_size=2, rescue_path=rescue)
    con_closed = _duckdb.connect(":memory:")
    con_closed.close()
    sink.con = con_closed  # any write now fails, as on a full disk
    records = [_record(url=f"https://s{i}.example/") for i in range(5)]
    for r in records:
        sink.put(r)
    with pytest.raises(store.StoreError, match="5 measurements saved to"):
        sink.close()
    saved = [json.loads(line) for line in rescue.read_text().splitlines()]
    assert [s["record"]["measurement_id"] for s in saved] == [r["measurement_id"] for r in records]


def test_undecodable_header_text_is_stored_not_lost(tmp_path):
    # aiohttp hands undecodable header bytes over as lone surrogates.
    record = _record(requests=[{"request": {"url": "https://a.example/", "method": "GET", "headers": {}},
                                "response": {"code": 200, "headers": {"X-Name": "caf\udce9"}, "body": "<title>caf\udce9</title>",
                                             "body_is_truncated": False},
                                "failure": None, "t0": 0.3, "t": 0.4, "transaction_id": 3, "x_redirect_index": 0}])
    con = store.connect(tmp_path / "v.duckdb")
    sink = store.Sink(con, rescue_path=tmp_path / "rescue.jsonl")
    sink.put(record)
    sink.close()
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 1
    headers = con.execute("SELECT headers FROM http_transactions WHERE side = 'probe'").fetchone()[0]
    assert "caf" in headers
    assert not (tmp_path / "rescue.jsonl").exists()
