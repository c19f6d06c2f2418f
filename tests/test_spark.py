"""`vantage analyze --engine spark` gives the local analysis's verdicts, row for row.

Three databases, each analysed locally (analysis.engine.analyze), exported with
`vantage export parquet`'s code (analysis.export.export_parquet), analysed on a
local Spark (local[2], one session for the module) by analysis.spark.run, and
the verdict rows (measurement, status, layer, method, confidence, confirmed,
rule) compared whole:

- lab-like synthetic measurements: every record the rule tests build
  (tests/test_analysis_rules.py, harvested by running them), plus throttling
  runs, spread over three countries and two days so that runs cross
  partitions (an offline measurement cleared by a neighbour across midnight, a
  throttling baseline split over two partitions, ip_info ASNs from another
  partition);
- OONI's 50 Web Connectivity QA measurements, imported;
- 100,000 synthetic measurements from bench/analyze_bench.py's generator.

Needs pyspark and Java 17+ (scripts/setup.sh --test installs both).
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import importlib.util
import inspect
import json
import shutil
import os
from pathlib import Path

import duckdb
import pytest

from analysis import spark as engine_spark
from analysis.engine import analyze
from analysis.export import export_parquet
from analysis_fixtures import FINGERPRINTS, control, http, page, q, tcp, throttling, tls, web
from probes.schema import SCHEMA_SQL
from probes.store import connect, write_all

try:
    engine_spark.check_environment()
    MISSING = None
except Exception as exc:  # no pyspark or no Java: say which
    MISSING = str(exc)

if MISSING is not None and os.environ.get("CI") == "true":  # CI installs pyspark and Java: absent is a failure
    raise RuntimeError(f"Spark is not usable under CI=true: {MISSING}")
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=MISSING or ""), pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ["198.18.0.0/15", "2001:2::/48"]
COLUMNS = "measurement_id, status, layer, method, round(confidence, 6) AS confidence, confirmed, evidence->>'rule' AS rule"


@pytest.fixture(scope="module")
def spark():
    session = engine_spark.session("local[2]")
    yield session
    session.stop()


def _fingerprints():
    return str(FINGERPRINTS) if FINGERPRINTS.is_dir() else "/nonexistent"


def _local_rows(con) -> list[tuple]:
    return con.execute(f"SELECT {COLUMNS} FROM verdicts ORDER BY measurement_id").fetchall()


def _spark_rows(out: Path) -> list[tuple]:
    c = duckdb.connect()
    return c.execute(f"SELECT {COLUMNS} FROM read_parquet('{out}/verdicts/*/*/*.parquet') ORDER BY measurement_id").fetchall()


def _compare(con, tmp: Path, spark, task_size: int | None = None, **kwargs) -> dict:
    """Analyse ``con`` locally, export it, analyse the export on Spark; assert equal verdict rows."""
    analyze(con, **kwargs)
    export_parquet(con, tmp / "in")
    # the export holds the local verdicts too: Spark must ignore them and write its own
    sizing = {"task_size": task_size} if task_size else {}
    result = engine_spark.run(tmp / "in", tmp / "out", spark=spark, schema_sql=SCHEMA_SQL, **sizing, **kwargs)
    local, remote = _local_rows(con), _spark_rows(tmp / "out")
    assert len(remote) == len(local) == result["analysed"]
    differ = [(a, b) for a, b in zip(local, remote) if a != b]
    assert not differ, f"{len(differ)} verdicts differ, first: local {differ[0][0]} spark {differ[0][1]}"
    assert local == remote
    return result


def _compare_views(con, out: Path) -> None:
    """The aggregate views Spark wrote (90_aggregates.sql: per partition, or tallies summed across
    tasks) equal the local views, row for row."""
    c = duckdb.connect()
    for view, layout in (("agg_country_day", "*/*/"), ("agg_asn", "*/"), ("agg_domain", ""), ("agg_category", "")):
        cols = [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
        mine = con.execute(f"SELECT {', '.join(cols)} FROM {view} ORDER BY ALL").fetchall()
        theirs = c.execute(f"SELECT {', '.join(cols)} FROM read_parquet('{out}/{view}/{layout}*.parquet', "
                           "hive_partitioning = true) ORDER BY ALL").fetchall()
        assert len(mine) > 0
        assert [tuple(str(x) for x in r) for r in theirs] == [tuple(str(x) for x in r) for r in mine], view
    assert not (out / engine_spark.TALLY).exists()  # the tasks' tallies are gone once summed


# --- lab-like synthetic measurements ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _harvest_rule_records_once() -> tuple[dict, ...]:
    return tuple(_harvest_rule_records())


def _harvest_rule_records() -> list[dict]:
    """Every record tests/test_analysis_rules.py analyses: its tests run with ``database`` recording."""
    spec = importlib.util.spec_from_file_location("_rules_for_spark", ROOT / "tests" / "test_analysis_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    records: list[dict] = []
    real = module.database

    def recording(batch, **kwargs):
        records.extend(batch)
        return real(batch, **kwargs)

    module.database = recording
    for name, fn in sorted(vars(module).items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        cases = [()]
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                cases = [v if isinstance(v, tuple) else (v,) for v in mark.args[1]]
        for args in cases:
            if len(inspect.signature(fn).parameters) != len(args):
                continue
            try:
                fn(*args)
            except Exception:  # a test that needs a fixture: its records are still kept
                pass
    return records


def _lab_records() -> list[dict]:
    records = copy.deepcopy(list(_harvest_rule_records_once()))
    assert len(records) >= 40, len(records)
    # Spread over three countries and two days (around midnight), keeping the run ids: runs then
    # cross partitions, and the context path is exercised for most of them.
    midnight = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    for i, record in enumerate(records):
        record["probe_cc"] = ("IR", "RU", "ZZ")[i % 3]
        when = midnight + dt.timedelta(seconds=(i - len(records) // 2) * 40)
        record["measurement_start_time"] = when.strftime("%Y-%m-%d %H:%M:%S")
    ip = "198.18.0.10"
    host = "late.example"
    # An offline measurement at 23:58 cleared by an online one of its run at 00:01 the next day, in
    # another country's partition (10_scope's five minutes, across two partitions).
    offline = web(f"https://{host}/", queries=[q(host, failure="dns_temporary_failure")], ctl=control(),
                  network_ok=False, run_id="run-midnight", cc="IR",
                  started=(midnight - dt.timedelta(minutes=2)).timestamp())
    online = web("https://ok.example/", queries=[q("ok.example", ip)], tcps=[tcp(ip)], tlss=[tls(ip, "ok.example")],
                 requests=[http("https://ok.example/", ip, body=page("Ok"))], ctl=control(), run_id="run-midnight",
                 cc="RU", started=(midnight + dt.timedelta(minutes=1)).timestamp())
    # A throttling run split over two days: each measurement's baseline is its run's others.
    throttled = []
    for k, (target, scrambled) in enumerate([(300, 3000), (2900, 3000), (3100, 3000), (2800, 3000), (250, 2900)]):
        r = throttling(f"https://t{k}.example/", target, scrambled, helper_kbit=3000, run_id="run-throttle")
        r["measurement_start_time"] = (midnight + dt.timedelta(minutes=k * 3 - 7)).strftime("%Y-%m-%d %H:%M:%S")
        r["probe_cc"] = "IR"
        throttled.append(r)
    # ip_info pooled by address: B's probe answer (mine) is in the control's AS only by what the
    # helper said about it in A, a measurement of another day and country (engine._asns).
    mine, theirs, cdn = "198.18.60.1", "198.18.70.1", "cdn-pool.example"
    b = web(f"http://{cdn}/", queries=[q(cdn, mine)], tcps=[tcp(mine, 80, "generic_timeout_error")],
            ctl=control(addrs=(theirs,), port=80, body=page("News"), title="News", tcp_ok={theirs: None, mine: None}),
            run_id="run-b", cc="IR", started=(midnight - dt.timedelta(hours=3)).timestamp())
    b["test_keys"]["control"]["ip_info"] = {theirs: {"asn": 64600, "flags": 2}}
    a = web("https://a-pool.example/", queries=[q("a-pool.example", mine)], tcps=[tcp(mine)],
            tlss=[tls(mine, "a-pool.example")], requests=[http("https://a-pool.example/", mine, body=page("A"))],
            ctl=control(addrs=(mine,)), run_id="run-a", cc="RU", started=(midnight + dt.timedelta(hours=3)).timestamp())
    a["test_keys"]["control"]["ip_info"] = {mine: {"asn": 64600, "flags": 2}}
    return records + [offline, online] + throttled + [a, b]


def test_lab_like_measurements(spark, tmp_path):
    con = connect(":memory:")
    records = _lab_records()
    write_all(con, [(r, None) for r in records])
    parts = con.execute("SELECT count(DISTINCT (CAST(start_time AS DATE), probe_cc)) FROM measurements").fetchone()[0]
    assert parts >= 6
    result = _compare(con, tmp_path, spark, public_networks=PUBLIC, fingerprints_dir=_fingerprints())
    assert result["partitions"] == parts
    assert result["context_measurements"] == 0  # one task holds them all at this size: see the next test
    # the rules' variety: many statuses and rules, not a set of oks
    rules = {r[-1] for r in _local_rows(con)}
    assert len(rules) >= 20, rules
    # the midnight neighbour cleared the offline flag: not "probe offline"
    offline = con.execute("SELECT v.evidence->>'rule' FROM verdicts v JOIN measurements m USING (measurement_id)"
                          " WHERE m.run_id = 'run-midnight' AND NOT m.probe_network_ok").fetchone()[0]
    assert offline != "probe_offline"
    pooled = con.execute("SELECT v.evidence->>'rule' FROM verdicts v JOIN measurements m USING (measurement_id)"
                         " WHERE m.run_id = 'run-b'").fetchone()[0]
    assert pooled == "tcp_timeout"  # vouched by A's ip_info, not dns_unvouched_then_failed
    # the aggregate views, by 90_aggregates.sql in Spark's tasks, equal the local views
    _compare_views(con, tmp_path / "out")


def test_lab_like_measurements_one_partition_a_task(spark, tmp_path):
    """The same with one partition per task: every crossing run comes in as context."""
    con = connect(":memory:")
    write_all(con, [(r, None) for r in _lab_records()])
    kwargs = {"public_networks": PUBLIC, "fingerprints_dir": _fingerprints()}
    analyze(con, **kwargs)
    export_parquet(con, tmp_path / "in")
    result = engine_spark.run(tmp_path / "in", tmp_path / "out", spark=spark, schema_sql=SCHEMA_SQL, task_size=1, **kwargs)
    assert result["tasks"] == result["partitions"]
    assert result["context_measurements"] > 0
    assert _spark_rows(tmp_path / "out") == _local_rows(con)
    _compare_views(con, tmp_path / "out")  # every task's tallies summed


# --- OONI's QA measurements ---------------------------------------------------------------------


@pytest.mark.shared
def test_ooni_qa(spark, tmp_path):
    from probes.ooni_import import record_from_ooni
    from shared import shared_path

    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    records = [record_from_ooni(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    assert len(records) == 50
    con = connect(":memory:")
    write_all(con, [(r, None) for r in records])
    _compare(con, tmp_path, spark, fingerprints_dir=str(shared_path("data", "fingerprints")))
    # the OONI views are written per partition too
    assert list((tmp_path / "out" / "ooni_comparison").glob("day=*/probe_cc=*/*.parquet"))


# --- 100,000 synthetic measurements -----------------------------------------------------------


def test_hundred_thousand_synthetic(spark, tmp_path):
    spec = importlib.util.spec_from_file_location("_analyze_bench", ROOT / "bench" / "analyze_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    db = tmp_path / "bench.duckdb"
    bench.generate(db, 100_000)
    con = duckdb.connect(str(db))
    try:
        # tasks of 15,000-30,000 measurements: several, each ending where the fewest runs cross
        result = _compare(con, tmp_path, spark, task_size=30_000, public_networks=PUBLIC,
                          fingerprints_dir=_fingerprints())
        _compare_views(con, tmp_path / "out")
    finally:
        con.close()
    assert result["analysed"] == 100_000
    # the generator's runs cycle through five countries: they cross partitions everywhere
    assert result["partitions"] > 5 and result["tasks"] >= 3
    assert result["context_measurements"] > 0


# --- packing partitions into tasks ---------------------------------------------------------------


def test_pack_cuts_where_fewest_runs_cross():
    """A task ends, within half to all of the target, at the gap the fewest runs cross (midnight, not
    the middle of a day); a partition above the target is a task of its own."""
    parts = [("IR", "d1", 10), ("RU", "d1", 10), ("IR", "d2", 10), ("RU", "d2", 10), ("IR", "d3", 50), ("RU", "d3", 5)]
    runs = [("day1", [("d1", "IR"), ("d1", "RU")]), ("midnight", [("d1", "RU"), ("d2", "IR")]),
            ("day2a", [("d2", "IR"), ("d2", "RU")]), ("day2b", [("d2", "IR"), ("d2", "RU")])]
    tasks, owner = engine_spark._pack(parts, 30, runs)
    assert [[(d, c) for d, c, _n in t.parts] for t in tasks] == [
        [("d1", "IR"), ("d1", "RU")], [("d2", "IR"), ("d2", "RU")], [("d3", "IR")], [("d3", "RU")]]
    assert engine_spark._split_runs(owner, runs) == 1  # only the run over midnight
    # filling each task to the target instead would split the day's two runs as well
    greedy = {("d1", "IR"): 0, ("d1", "RU"): 0, ("d2", "IR"): 0, ("d2", "RU"): 1}
    assert sum(len({greedy[k] for k in keys}) - 1 for _r, keys in runs) == 2


# --- errors -------------------------------------------------------------------------------------


def test_not_an_export(tmp_path):
    with pytest.raises(engine_spark.AnalysisError, match="measurements/"):
        engine_spark.run(tmp_path, tmp_path / "out", schema_sql=SCHEMA_SQL)
    with pytest.raises(engine_spark.AnalysisError, match="another folder"):
        engine_spark.run(tmp_path, tmp_path, schema_sql=SCHEMA_SQL)


def test_missing_java_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(engine_spark.AnalysisError, match="openjdk-17-jre-headless"):
        engine_spark.check_environment()


def test_cli(tmp_path):
    import subprocess
    import sys

    con = connect(":memory:")
    write_all(con, [(r, None) for r in _lab_records()[:30]])
    stored = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    export_parquet(con, tmp_path / "in")
    vantage = [sys.executable, "-m", "cli.main"]
    proc = subprocess.run(vantage + ["analyze", "--engine", "spark", "--input", str(tmp_path / "in"), "--out",
                                     str(tmp_path / "out"), "--master", "local[2]", "--public-network", PUBLIC[0],
                                     "--fingerprints-dir", _fingerprints(), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["engine"] == "spark" and summary["analysed"] == stored > 20
    assert sum(r["count"] for r in summary["verdicts"]) == stored
    bad = subprocess.run(vantage + ["analyze", "--engine", "spark", "--input", str(tmp_path / "in")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--out" in bad.stderr
    mixed = subprocess.run(vantage + ["analyze", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=ROOT)
    assert mixed.returncode == 2 and "--engine spark" in mixed.stderr
