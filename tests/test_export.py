"""`vantage export ooni` and `vantage export parquet` (analysis/export.py, cli/export.py).

Round trips: our measurements -> OONI's format -> `vantage import ooni` gives
the same observation rows and the same verdicts; Parquet read back with
DuckDB and with pyarrow holds the database's rows; a re-export replaces the
period's partitions only.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import duckdb
import pyarrow.dataset as ds
from click.testing import CliRunner

from analysis.engine import analyze
from analysis.export import export_ooni, export_parquet, exported_tables, ooni_verdict
from analysis_fixtures import FINGERPRINTS, control, http, page, q, tcp, tls, web
from cli.main import cli
from probes.store import connect, write_all

IP = "198.18.0.10"
NEWS = page("Daily News", 20000)
BLOCKPAGE = page("Access denied", 3000)
DAY1 = 1_780_000_000.0           # 2026-05-28
DAY2 = DAY1 + 3 * 86400          # 2026-05-31

# Rows of the measurements table that an export/import legitimately changes:
# the stored JSON (OONI's field names in it) and OONI's verdict columns, which
# the export fills from our verdict.
CHANGED = {"measurements": ("record", "ooni_blocking", "ooni_accessible")}


def _records() -> list[dict]:
    ok = web("https://news.example/", queries=[q("news.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "news.example")],
             requests=[http("https://news.example/", IP, body=NEWS)], ctl=control(addrs=(IP,), body=NEWS, title="Daily News"),
             started=DAY1, cc="IR")
    nx = web("https://gone.example/", queries=[q("gone.example", failure="dns_nxdomain_error")],
             ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), started=DAY1, cc="IR")
    late = web("https://late.example/", queries=[q("late.example", "10.10.34.35", engine="udp"),
                                                   q("late.example", IP, engine="udp", index=1)],
               tcps=[tcp(IP)], tlss=[tls(IP, "late.example", failure="connection_reset")],
               ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), started=DAY1, cc="IR")
    reset = web("https://reset.example/", queries=[q("reset.example", IP)], tcps=[tcp(IP, failure="connection_reset")],
                ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), started=DAY2, cc="MM")
    redirected = web("http://hop.example/", queries=[q("hop.example", IP)], tcps=[tcp(IP, 80)],
                     requests=[http("http://hop.example/", IP, status=302, body="", index=0),
                               http("http://hop.example/blocked", IP, body=BLOCKPAGE, index=1)],
                     ctl=control(addrs=(IP,), body=NEWS, title="Daily News", port=80), started=DAY2, cc="MM")
    binary = web("https://bin.example/", queries=[q("bin.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "bin.example")],
                 requests=[http("https://bin.example/", IP, body="\u00e9t\u00e9 \u2014 caf\u00e9 <title>Caf\u00e9</title>")],
                 ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), started=DAY2, cc=None)
    return [ok, nx, late, reset, redirected, binary]


def _database(path: Path, records: list[dict]):
    con = connect(path)
    write_all(con, [(r, None) for r in records])
    analyze(con, fingerprints_dir=FINGERPRINTS, public_networks=["198.18.0.0/15"])
    return con


def _rows(con, table: str, exclude: tuple[str, ...] = ()) -> list[tuple]:
    skip = f" EXCLUDE ({', '.join(exclude)})" if exclude else ""
    return con.execute(f"SELECT *{skip} FROM {table} ORDER BY ALL").fetchall()


def _verdicts(con) -> list[tuple]:
    return con.execute("SELECT measurement_id, status, layer, method, confidence, confirmed FROM verdicts ORDER BY ALL").fetchall()


def test_round_trip_export_import_gives_the_same_rows_and_verdicts(tmp_path):
    original = _database(tmp_path / "a.duckdb", _records())
    out = tmp_path / "ours.jsonl.gz"
    result = CliRunner().invoke(cli, ["export", "ooni", "--db", str(tmp_path / "a.duckdb"), "--out", str(out), "--json"])
    original.close()
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["measurements"] == 6

    # OONI's shape: getaddrinfo, late answers apart, address, bodies back, our verdict as theirs
    lines = [json.loads(line) for line in gzip.open(out, "rt", encoding="utf-8")]
    by_input = {m["input"]: m for m in lines}
    assert all(m["probe_ip"] == "127.0.0.1" and m["x_measurement_id"] and m["data_format_version"] for m in lines)
    assert {x["engine"] for x in by_input["https://news.example/"]["test_keys"]["queries"]} == {"getaddrinfo"}
    late = by_input["https://late.example/"]["test_keys"]
    assert [x["answers"][0]["ipv4"] for x in late["x_dns_duplicate_responses"]] == [IP]
    hops = by_input["http://hop.example/"]["test_keys"]["requests"]
    assert hops[1]["response"]["body"] == BLOCKPAGE and hops[1]["address"] == f"{IP}:80"
    assert "x_body_in" not in json.dumps(lines)
    assert by_input["https://news.example/"]["test_keys"]["blocking"] is False
    assert by_input["https://news.example/"]["test_keys"]["accessible"] is True
    assert by_input["https://gone.example/"]["test_keys"]["blocking"] == "dns"
    assert by_input["http://hop.example/"]["test_keys"]["blocking"] == "http-diff"
    reset = by_input["https://reset.example/"]["test_keys"]  # inconclusive: OONI has no word for it
    assert (reset["blocking"], reset["accessible"], reset["x_verdict"]["status"]) == (None, None, "inconclusive")

    result = CliRunner().invoke(cli, ["import", "ooni", "-q", "--json", "--db", str(tmp_path / "b.duckdb"), str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 6
    again = connect(tmp_path / "b.duckdb")
    analyze(again, fingerprints_dir=FINGERPRINTS, public_networks=["198.18.0.0/15"])
    before = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    for table in ("measurements", "dns_answers", "tcp_connects", "tls_handshakes", "http_transactions",
                  "network_events", "throughput_samples"):
        assert _rows(again, table, CHANGED.get(table, ())) == _rows(before, table, CHANGED.get(table, ())), table
    assert _verdicts(again) == _verdicts(before)
    assert len(_verdicts(before)) == 6 and {v[1] for v in _verdicts(before)} >= {"ok", "blocked"}
    # OONI's columns now hold our verdict, as OONI would say it
    theirs = again.execute("SELECT measurement_id, ooni_blocking, ooni_accessible FROM measurements").fetchall()
    for mid, blocking, accessible in theirs:
        want = ooni_verdict(*before.execute("SELECT status, layer, method FROM verdicts WHERE measurement_id = ?", [mid]).fetchone())
        assert (blocking, accessible) == (None if want[0] is None else str(want[0]).lower(), want[1])
    # re-importing our own export into our own database adds nothing
    result = CliRunner().invoke(cli, ["import", "ooni", "-q", "--json", "--db", str(tmp_path / "b.duckdb"), str(out)])
    assert json.loads(result.stdout)["imported"] == 0


def test_export_ooni_since_until(tmp_path):
    con = _database(tmp_path / "a.duckdb", _records())
    out = tmp_path / "day1.jsonl.gz"
    day2 = dt.datetime.fromtimestamp(DAY2, dt.timezone.utc).replace(tzinfo=None)
    assert export_ooni(con, out, until=day2.replace(hour=0, minute=0, second=0)) == 3
    assert export_ooni(con, out, since=day2.replace(hour=0, minute=0, second=0)) == 3
    assert {json.loads(line)["input"] for line in gzip.open(out, "rt")} == {
        "https://reset.example/", "http://hop.example/", "https://bin.example/"}


def _parquet(root: Path, table: str) -> str:
    return f"read_parquet('{root / table}/**/*.parquet', hive_partitioning = true)"


def test_parquet_export_reads_back_with_duckdb_and_pyarrow(tmp_path):
    con = _database(tmp_path / "a.duckdb", _records())
    con.close()
    out = tmp_path / "pq"
    result = CliRunner().invoke(cli, ["export", "parquet", "--db", str(tmp_path / "a.duckdb"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["rows"]
    con = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    tables = exported_tables(con)
    assert {"measurements", "dns_answers", "tcp_connects", "tls_handshakes", "http_transactions", "verdicts"} <= set(tables)
    assert (out / "measurements" / "day=2026-05-28" / "probe_cc=IR").is_dir()
    assert (out / "measurements" / "day=2026-05-31" / "probe_cc=ZZ").is_dir()  # no country: OONI's ZZ
    for table in tables:
        assert counts[table] == con.execute(f"SELECT count(*) FROM {table}").fetchone()[0], table
        if not counts[table]:
            continue
        columns = [r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]).fetchall()]
        cols = ", ".join(columns)
        # DuckDB: the same rows, every column (probe_cc of measurements comes back from the folder names)
        cast = ", ".join(f"CAST({c} AS VARCHAR)" for c in columns)
        db_rows = con.execute(f"SELECT {cast} FROM {table} ORDER BY ALL").fetchall()
        pq_rows = con.execute(f"SELECT {cast} FROM (SELECT {cols} FROM {_parquet(out, table)}) ORDER BY ALL").fetchall()
        if table == "measurements":  # the folder says ZZ where the database says NULL
            db_rows = sorted(tuple("ZZ" if (c == "probe_cc" and v is None) else v for c, v in zip(columns, r)) for r in db_rows)
            pq_rows = sorted(pq_rows)
        assert pq_rows == db_rows, table
        # pyarrow: the hive partitions, the same measurement ids
        dataset = ds.dataset(out / table, format="parquet", partitioning="hive")
        read = dataset.to_table()
        assert read.num_rows == counts[table]
        assert {"day", "probe_cc"} <= set(read.column_names)
        assert sorted(read.column("measurement_id").to_pylist()) == sorted(
            r[0] for r in con.execute(f"SELECT measurement_id FROM {table}").fetchall())


def test_parquet_re_export_replaces_the_period_only(tmp_path):
    con = _database(tmp_path / "a.duckdb", _records())
    out = tmp_path / "pq"
    export_parquet(con, out)
    day1 = out / "measurements" / "day=2026-05-28" / "probe_cc=IR"
    day2 = out / "measurements" / "day=2026-05-31" / "probe_cc=MM"
    day2_files = {p.name: p.stat().st_mtime_ns for p in day2.iterdir()}
    (day1 / "stale.parquet").write_bytes(b"not parquet: must go with the old partition")
    con.execute("DELETE FROM verdicts WHERE measurement_id IN (SELECT measurement_id FROM measurements WHERE input = 'https://gone.example/')")
    con.execute("DELETE FROM measurements WHERE input = 'https://gone.example/'")
    since = dt.datetime(2026, 5, 28)
    counts = export_parquet(con, out, since=since, until=dt.datetime(2026, 5, 29))
    assert counts["measurements"] == 2
    assert not (day1 / "stale.parquet").exists()
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{day1}/*.parquet')").fetchall()[0][0] == 2
    assert {p.name: p.stat().st_mtime_ns for p in day2.iterdir()} == day2_files  # other days untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]  # no staging left
    total = duckdb.sql(f"SELECT count(*) FROM {_parquet(out, 'measurements')}").fetchall()[0][0]
    assert total == con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 5


def _re_export_while_reading(con, out: Path, times: int) -> tuple[int, list[str]]:
    """Re-export one day ``times`` times while a thread opens and lists its
    partition; returns (looks, what went wrong)."""
    import threading

    partition = out / "measurements" / "day=2026-05-28" / "probe_cc=IR"
    wrong, looks, done = [], [0], threading.Event()

    def read() -> None:
        while not done.is_set():
            looks[0] += 1
            try:
                fd = os.open(partition, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                wrong.append("no partition")
                continue
            try:
                names = os.listdir(fd)
                # an empty listing is fine only from the old partition, swapped away and deleted meanwhile
                if not any(n.endswith(".parquet") for n in names) and os.fstat(fd).st_nlink > 0 \
                        and os.fstat(fd).st_ino == os.stat(partition).st_ino:
                    wrong.append("empty partition")
            except FileNotFoundError:
                wrong.append("no partition")
            finally:
                os.close(fd)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(times):
            export_parquet(con, out, since=dt.datetime(2026, 5, 28), until=dt.datetime(2026, 5, 29))
    finally:
        done.set()
        reader.join()
    return looks[0], wrong


def test_parquet_re_export_never_leaves_a_partition_missing(tmp_path, monkeypatch):
    """A reader looking at a partition while it is re-exported, again and
    again, always finds one: the swap is one atomic step (renameat2's
    RENAME_EXCHANGE)."""
    from analysis import export
    from core.download import exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "y").write_text("b")
    assert exchange(a, b)  # this kernel and file system can: the export swaps, never two renames
    assert (a / "y").exists() and (b / "x").exists()

    con = _database(tmp_path / "a.duckdb", _records())
    out = tmp_path / "pq"
    export_parquet(con, out)
    looks, wrong = _re_export_while_reading(con, out, 10)
    assert looks > 10 and not wrong

    # Without the exchange (another system), the old partition is renamed away
    # before the new one comes in: between the two renames there is none.
    monkeypatch.setattr(export, "exchange", lambda new, old: False)
    partition = out / "measurements" / "day=2026-05-28" / "probe_cc=IR"
    rename, gap = os.rename, []

    def observed(src, dst):
        rename(src, dst)
        if Path(src) == partition:
            gap.append(partition.exists())

    monkeypatch.setattr(export.os, "rename", observed)
    export_parquet(con, out, since=dt.datetime(2026, 5, 28), until=dt.datetime(2026, 5, 29))
    assert gap == [False]
