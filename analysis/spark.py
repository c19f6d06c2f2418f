"""The same analysis on Apache Spark, over the Parquet layout `vantage export parquet` writes.

One source of the rules: Spark never sees a rule. It plans and distributes the
work; every task runs the DuckDB rule set itself (``analysis.engine.analyze``
on an in-memory DuckDB) over one Parquet partition, so the verdicts are those
of the local analysis by construction. Why this and not a transpiled copy of
the SQL, with measurements: docs/scale.md.

Layout read (``IN``) and written (``OUT``), hive-style as analysis/export.py
writes it::

    IN/measurements/day=2026-12-01/probe_cc=IR/data_0.parquet
    IN/dns_answers/day=.../probe_cc=.../...      (every observation table)
    OUT/verdicts/day=.../probe_cc=.../data_0.parquet   (the verdicts table's columns)
    OUT/agg_country_day/day=.../probe_cc=.../, OUT/ooni_comparison/..., OUT/ooni_disagreements/...
    OUT/agg_asn/probe_cc=.../, OUT/agg_domain/, OUT/agg_category/

The unit of work is one (day, probe_cc) partition: every row of a measurement
lives in its partition (the export partitions observation rows by their
measurement's day and country). What the rules compare *across* measurements
is the run: a measurement flagged offline is cleared by another measurement of
its run within five minutes (10_scope.sql), and a throttling measurement is
judged against its run's baseline (throttling.py), an address family counts as
blocked only where another probe connect of that family succeeded in the run
(30_transport.sql); and the helper's ip_info
ASNs are pooled by address (engine._asns). A run that crosses a partition
(midnight, or a probe that moves) gives the task of each partition its
measurements in the other partitions as *context*: loaded into the task's
database with a placeholder verdict, so ``analyze(only_missing=True)`` judges
only the partition's own measurements while the rules see the whole run.
The ip_info ASNs are pooled by Spark and handed to every task.

The aggregate views (sql/90_aggregates.sql) are computed by the same SQL:
agg_country_day (and the per-measurement OONI views) in each partition's task;
for agg_asn / agg_domain / agg_category each task writes its measurements'
agg_tally rows (counts only, so they add up), Spark sums them by grain and key
(one shuffle of counts, not of the measurements), and DuckDB runs the views
over the sums in Spark tasks.

Spark is optional (``pip install 'vantage[spark]'``) and needs Java 17+;
a missing one is an ``AnalysisError`` naming what to install.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .db import AnalysisError

MEASUREMENTS = "measurements"
SKIP_TABLES = {"verdicts"}  # an export may hold earlier verdicts: this run writes its own
PARTITION_VIEWS = ("agg_country_day", "ooni_comparison", "ooni_disagreements")
# Aggregates whose grain crosses partitions: (view, the key Spark groups by, the key OUT is partitioned by)
GLOBAL_VIEWS = (("agg_asn", ("probe_cc", "probe_asn"), ("probe_cc",)),
                ("agg_domain", ("domain",), ()),
                ("agg_category", ("category_code",), ()))
CONTEXT_COLUMNS = ("measurement_id", "run_id", "test_name", "probe_network_ok", "start_time")
PLACEHOLDER_RULE = "spark_context"
DEFAULT_MASTER = f"local[{os.cpu_count() or 2}]"


# --- Environment ---------------------------------------------------------------


def check_environment() -> None:
    """pyspark importable and a Java runtime on PATH or JAVA_HOME; else one line naming what to install."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise AnalysisError("--engine spark needs pyspark: pip install 'vantage[spark]' (or pip install 'pyspark>=3.5')") from None
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and (Path(java_home) / "bin" / "java").is_file()) and shutil.which("java") is None:
        raise AnalysisError("--engine spark needs a Java runtime (17 or later): apt-get install openjdk-17-jre-headless"
                            " (or set JAVA_HOME)")


def session(master: str | None = None, app_name: str = "vantage-analyze", conf: dict[str, str] | None = None):
    """A SparkSession: ``master`` when given (local[N], spark://, yarn, k8s://...); without one, the
    master spark-submit configured, else local[N]."""
    check_environment()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if (master or DEFAULT_MASTER).startswith("local"):
        # local workers run this interpreter (its duckdb, its vantage); a cluster's: PYSPARK_PYTHON
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no "resolves to a loopback address" warning
    if master:
        builder = builder.master(master)
    elif not os.environ.get("SPARK_ENV_LOADED") and "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(DEFAULT_MASTER)
    settings = {
        # Spark's start-up chatter (log4j INFO/WARN) off the user's terminal: errors only
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={_quiet_log4j()}",
        "spark.sql.session.timeZone": "UTC",
        # day=2026-12-01 and probe_cc=NA stay text, as the folder names say
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
    }
    if (master or DEFAULT_MASTER).startswith("local"):
        settings["spark.sql.shuffle.partitions"] = str(2 * (os.cpu_count() or 2))
    settings.update(conf or {})
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j/Java start-up failures come as many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AnalysisError(f"cannot start Spark ({master or 'default master'}): {first}") from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _quiet_log4j() -> str:
    """A log4j2 configuration that prints errors only (a file in the temp folder, written once)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / "vantage-spark-log4j2.properties"
    text = ("rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\n"
            "appender.console.type = Console\nappender.console.name = console\nappender.console.target = SYSTEM_ERR\n"
            "appender.console.layout.type = PatternLayout\nappender.console.layout.pattern = spark: %p %c{1}: %m%n\n")
    if not path.is_file() or path.read_text() != text:
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_text(text)
        os.replace(temp, path)
    return str(path)


# --- The plan (driver) -----------------------------------------------------------


@dataclass
class Task:
    """Some (day, probe_cc) partitions judged together in one DuckDB, and where their runs' other
    measurements are (partitions of other tasks -> run ids)."""
    root: str
    parts: list[tuple[str, str, int]]                        # (day, cc, measurements)
    tables: dict[tuple[str, str], list[str]]                 # partition -> the tables it has
    context: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(n for _d, _c, n in self.parts)


def _part_dir(root: str, table: str, day: str, cc: str) -> str:
    return f"{root.rstrip('/')}/{table}/day={day}/probe_cc={cc}"


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def input_tables(root: str) -> list[str]:
    """The table folders of ``root`` (measurements first), verdicts left out."""
    if not _is_local(root):
        return [MEASUREMENTS]  # remote: the caller names the others (tables=...)
    base = Path(_local(root))
    if not base.is_dir():
        raise AnalysisError(f"no such folder: {root}")
    if not (base / MEASUREMENTS).is_dir():
        raise AnalysisError(f"no measurements/ folder in {root}: not the layout `vantage export parquet` writes")
    names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                   and p.name not in SKIP_TABLES and any(c.name.startswith("day=") for c in p.iterdir()))
    return [MEASUREMENTS] + [n for n in names if n != MEASUREMENTS]


def plan(spark, root: str, tables: list[str], target: int = 100_000) -> tuple[list[Task], list[tuple[str, int]]]:
    """The tasks (largest first) and the pooled ip_info ASNs, computed by Spark from the measurements.

    Partitions are packed into tasks of about ``target`` measurements, in the order (country then
    day, or day then country) that splits fewer runs between tasks; a partition larger than that
    is a task of its own."""
    from pyspark.sql import functions as F

    m = (spark.read.option("basePath", f"{root}/{MEASUREMENTS}").parquet(f"{root}/{MEASUREMENTS}")
         .select("measurement_id", "run_id", "day", "probe_cc"))
    parts = sorted((r["probe_cc"], r["day"], r["count"]) for r in m.groupBy("day", "probe_cc").count().collect())
    # Runs seen in more than one partition: each of their partitions needs the others.
    spanning = (m.where(F.col("run_id").isNotNull())
                .groupBy("run_id").agg(F.collect_set(F.struct("day", "probe_cc")).alias("parts"))
                .where(F.size("parts") > 1).collect())
    present = {t: _present(root, t) for t in tables}
    runs = [(r["run_id"], [(p["day"], p["probe_cc"]) for p in r["parts"]]) for r in spanning]
    # Pack in the order that leaves the fewest runs split between tasks: country by country in day
    # order (a probe's runs stay in its country; those over midnight join neighbouring days), or day
    # by day (runs that move between countries within a day).
    tasks, owner = min((_pack(order, target, runs) for order in (parts, sorted(parts, key=lambda p: (p[1], p[0])))),
                       key=lambda packed: _split_runs(packed[1], runs))
    for task in tasks:
        for day, cc, _n in task.parts:
            task.root = root
            task.tables[(day, cc)] = [t for t in tables if present[t] is None or (day, cc) in present[t]]
    for run_id, keys in runs:
        for key in keys:
            task = owner[key]
            for other in keys:
                if owner[other] is not task:
                    listed = task.context.setdefault(other, [])
                    if not listed or listed[-1] != run_id:
                        listed.append(run_id)
    asns: list[tuple[str, int]] = []
    if "ip_info" in tables:
        info = spark.read.option("basePath", f"{root}/ip_info").parquet(f"{root}/ip_info")
        asns = [(r[0], int(r[1])) for r in info.where(F.col("asn") > 0).select(F.lower("ip"), "asn").distinct().collect()]
    return sorted(tasks, key=lambda t: -t.count), asns


def _pack(parts: list[tuple[str, str, int]], target: int,
          runs: list[tuple[str, list[tuple[str, str]]]] = ()) -> tuple[list[Task], dict[tuple[str, str], Task]]:
    """Consecutive partitions (cc, day, n) into tasks of ``target`` measurements at most (a larger
    partition is a task of its own) and half of it at least: each task ends at the boundary, within
    that window, that the fewest runs cross (e.g. midnight, not the middle of a day)."""
    position = {(day, cc): i for i, (cc, day, _n) in enumerate(parts)}
    crossing = [0] * (len(parts) + 1)  # crossing[i]: runs with partitions on both sides of the gap after i
    for _run, keys in runs:
        spots = [position[k] for k in keys if k in position]
        if spots:
            crossing[min(spots)] += 1
            crossing[max(spots)] -= 1
    for i in range(1, len(crossing)):
        crossing[i] += crossing[i - 1]
    tasks: list[Task] = []
    owner: dict[tuple[str, str], Task] = {}
    start = 0
    while start < len(parts):
        end, size, best = start, parts[start][2], None
        while True:
            if size * 2 >= target and (best is None or crossing[end] <= crossing[best]):
                best = end
            if end + 1 >= len(parts) or size + parts[end + 1][2] > target:
                break
            end += 1
            size += parts[end][2]
        stop = end if end + 1 >= len(parts) or best is None else best
        task = Task("", [], {})
        for cc, day, n in parts[start:stop + 1]:
            task.parts.append((day, cc, n))
            owner[(day, cc)] = task
        tasks.append(task)
        start = stop + 1
    return tasks, owner


def _split_runs(owner: dict[tuple[str, str], Task], runs: list[tuple[str, list[tuple[str, str]]]]) -> int:
    """How many (run, task) pairs a packing leaves needing context."""
    return sum(len({id(owner[k]) for k in keys}) - 1 for _run, keys in runs)


def _present(root: str, table: str) -> set[tuple[str, str]] | None:
    """The (day, cc) partitions a table has (None: cannot list, assume all)."""
    if not _is_local(root):
        return None
    base = Path(_local(root)) / table
    found = set()
    for day in base.glob("day=*"):
        for cc in day.glob("probe_cc=*"):
            found.add((day.name[4:], cc.name[9:]))
    return found


# --- One task (executor) ----------------------------------------------------------


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _files(folder: str) -> str:
    return _q(folder.rstrip("/") + "/*.parquet")


def _read(root: str, table: str, day: str, cc: str) -> str:
    return f"read_parquet({_files(_part_dir(root, table, day, cc))}, hive_partitioning = false)"


def load_partitions(con, task: Task, schema_sql: str | None, asns: Iterable[tuple[str, int]] = ()) -> int:
    """Fill an empty DuckDB with the task's partitions and their context; returns how many context
    measurements (loaded for the rules to read, not to be judged: listed in _s_context)."""
    if schema_sql:
        con.execute(schema_sql)
        # The probe's primary key on measurements is half the load's time (an index over the ids)
        # and the rules never use it: the same columns and types, without it.
        con.execute("CREATE TABLE _s_measurements AS SELECT * FROM measurements LIMIT 0")
        con.execute("DROP TABLE measurements")
        con.execute("ALTER TABLE _s_measurements RENAME TO measurements")
    con.execute("CREATE TEMP TABLE _s_part (measurement_id VARCHAR, day VARCHAR, probe_cc VARCHAR)")
    created = set()
    for day, cc, _n in task.parts:
        for table in task.tables[(day, cc)]:
            cc_column = f", {_q(cc)} AS probe_cc" if table == MEASUREMENTS else ""
            select = f"SELECT *{cc_column} FROM {_read(task.root, table, day, cc)}"
            if schema_sql or table in created:
                con.execute(f"INSERT INTO {table} BY NAME {select}")
            else:
                con.execute(f"CREATE TABLE {table} AS {select}")
                created.add(table)
        con.execute(f"INSERT INTO _s_part SELECT measurement_id, ?, ? FROM {_read(task.root, MEASUREMENTS, day, cc)}",
                    [day, cc])
    if not schema_sql:
        missing = {"network_events", "throughput_samples", "ip_info", "dns_answers", "tcp_connects",
                   "tls_handshakes", "http_transactions"} - created
        if missing:
            raise AnalysisError(f"the input has no {', '.join(sorted(missing))}: pass the probe's schema (the CLI does)")
    con.execute("CREATE TEMP TABLE _s_context (measurement_id VARCHAR)")
    for (day, cc), runs in sorted(task.context.items()):
        where = "run_id IN (SELECT unnest(?::VARCHAR[]))"
        source = _read(task.root, MEASUREMENTS, day, cc)
        # Throttling measurements of the run: whole rows and their samples (the run's baseline);
        # the others: what 10_scope reads of a neighbour.
        con.execute(f"INSERT INTO measurements BY NAME SELECT *, {_q(cc)} AS probe_cc FROM {source}"
                    f" WHERE {where} AND test_name = 'throttling'", [runs])
        con.execute(f"INSERT INTO measurements BY NAME SELECT {', '.join(CONTEXT_COLUMNS)} FROM {source}"
                    f" WHERE {where} AND test_name IS DISTINCT FROM 'throttling'", [runs])
        con.execute(f"INSERT INTO _s_context SELECT measurement_id FROM {source} WHERE {where}", [runs])
        samples = _part_dir(task.root, "throughput_samples", day, cc)
        if not _is_local(samples) or Path(_local(samples)).is_dir():
            con.execute(f"INSERT INTO throughput_samples BY NAME SELECT * FROM {_read(task.root, 'throughput_samples', day, cc)}"
                        " WHERE measurement_id IN (SELECT measurement_id FROM measurements"
                        f" WHERE test_name = 'throttling' AND {where})", [runs])
        # The probe's TCP connects: whether an address family works for the probe in the run (30_transport).
        connects = _part_dir(task.root, "tcp_connects", day, cc)
        if not _is_local(connects) or Path(_local(connects)).is_dir():
            con.execute(f"INSERT INTO tcp_connects BY NAME SELECT * FROM {_read(task.root, 'tcp_connects', day, cc)}"
                        f" WHERE side = 'probe' AND measurement_id IN (SELECT measurement_id FROM {source} WHERE {where})",
                        [runs])
    context = con.execute("SELECT count(*) FROM _s_context").fetchall()[0][0]
    asns = list(asns)
    if asns:
        # The ip_info ASNs of every partition, by address (engine._asns pools them so), for the
        # addresses this task's DNS gave.
        import pyarrow as pa  # through Arrow: executemany costs ~1 ms a row, and a pool has many addresses

        ips, numbers = zip(*asns)
        con.register("_s_asn_rows", pa.table({"ip": pa.array(ips, pa.string()), "asn": pa.array(numbers, pa.int32())}))
        con.execute("CREATE TEMP TABLE _s_asn AS SELECT ip, asn FROM _s_asn_rows")
        con.unregister("_s_asn_rows")
        first = con.execute("SELECT min(measurement_id) FROM _s_part").fetchall()[0][0]
        con.execute("INSERT INTO ip_info BY NAME SELECT ? AS measurement_id, 'control' AS side, a.ip, a.asn FROM _s_asn a"
                    " WHERE a.ip IN (SELECT DISTINCT lower(answer) FROM dns_answers WHERE answer IS NOT NULL)"
                    " AND a.ip NOT IN (SELECT lower(ip) FROM ip_info WHERE asn > 0)", [first])
        con.execute("DROP TABLE _s_asn")
    return context


def _write(con, select: str, folder: str, name: str = "data_0.parquet") -> None:
    """COPY ``select`` to folder/name: written beside it, then renamed into place."""
    if _is_local(folder):
        target = Path(_local(folder))
        target.mkdir(parents=True, exist_ok=True)
        temp = target / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        con.execute(f"COPY ({select}) TO {_q(temp)} (FORMAT PARQUET)")
        os.replace(temp, target / name)
    else:
        con.execute(f"COPY ({select}) TO {_q(folder.rstrip('/') + '/' + name)} (FORMAT PARQUET)")


def run_task(task: Task, out: str, options: dict[str, Any]) -> dict[str, Any]:
    """Judge the task's partitions with the DuckDB rule set; write their verdicts and partition views."""
    import duckdb

    from .db import ensure_schema
    from .engine import analyze, install_views

    started = time.monotonic()
    con = duckdb.connect(":memory:", config={"threads": int(options.get("threads") or 1),
                                             "memory_limit": options.get("memory_limit") or "1GB"})
    try:
        context = load_partitions(con, task, options.get("schema_sql"), options.get("asns") or ())
        kwargs = {k: options[k] for k in ("public_networks", "fingerprints_dir", "asn_db") if options.get(k) is not None}
        if context:
            ensure_schema(con)
            con.execute("INSERT INTO verdicts (measurement_id, status, evidence) SELECT measurement_id, 'inconclusive',"
                        f" json_object('rule', '{PLACEHOLDER_RULE}') FROM _s_context")
        analyze(con, only_missing=bool(context), **kwargs)
        if context:
            for table in ("verdicts", "ip_info", "throughput_samples", "tcp_connects", "measurements"):
                con.execute(f"DELETE FROM {table} WHERE measurement_id IN (SELECT measurement_id FROM _s_context)")
            install_views(con)
        for day, cc, _n in task.parts:
            part = f"SELECT measurement_id FROM _s_part WHERE day = {_q(day)} AND probe_cc = {_q(cc)}"
            _write(con, f"SELECT * FROM verdicts WHERE measurement_id IN ({part}) ORDER BY measurement_id",
                   _part_dir(out, "verdicts", day, cc))
            for view in PARTITION_VIEWS:
                if view == "agg_country_day":
                    select = f"SELECT * FROM {view} WHERE probe_cc = {_q(cc)} AND coalesce(CAST(day AS VARCHAR), 'unknown') = {_q(day)}"
                else:
                    select = f"SELECT * FROM {view} WHERE measurement_id IN ({part})"
                if con.execute(f"SELECT count(*) FROM ({select})").fetchone()[0]:
                    _write(con, f"{select} ORDER BY ALL", _part_dir(out, view, day, cc))
        _write_tally(con, out)
        counts = con.execute("SELECT status, layer, method, count(*), count(*) FILTER (WHERE confirmed) FROM verdicts"
                             " GROUP BY ALL").fetchall()
    finally:
        con.close()
    return {"partitions": len(task.parts), "measurements": task.count, "context": context,
            "counts": [list(c) for c in counts], "seconds": round(time.monotonic() - started, 3)}


# --- Cross-partition aggregates -------------------------------------------------------


def _arrow(con, query: str):
    """A query's result as an Arrow table (DuckDB 2 renamed arrow() to_arrow_table())."""
    relation = con.sql(query)
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


TALLY = "_tally"  # OUT/_tally/: each task's agg_tally rows of the cross-partition grains (removed at the end)
TALLY_KEYS = ("grain", "probe_cc", "day", "probe_asn", "domain", "category_code")
AGG_MEASUREMENT_COLUMNS = (("measurement_id", "VARCHAR"), ("input", "VARCHAR"), ("probe_cc", "VARCHAR"),
                           ("probe_asn", "VARCHAR"), ("domain", "VARCHAR"), ("category_code", "VARCHAR"),
                           ("start_time", "TIMESTAMP"))


def _write_tally(con, out: str) -> None:
    """The task's agg_tally rows for the grains that cross partitions, to OUT/_tally/ (one file a task)."""
    grains = ", ".join(_q(view[len("agg_"):]) for view, _key, _layout in GLOBAL_VIEWS)
    _write(con, f"SELECT * FROM agg_tally WHERE grain IN ({grains})", f"{out}/{TALLY}", f"part-{uuid.uuid4().hex}.parquet")


def _aggregate_partition(out: str):
    """A mapInArrow function: summed tallies (every key of this Spark partition whole) into DuckDB as
    agg_tally, 90_aggregates.sql's views over them, the cross-partition views written under OUT;
    yields (view, rows) counts."""
    views = tuple(view for view, _key, _layout in GLOBAL_VIEWS)
    layouts = {view: layout for view, _key, layout in GLOBAL_VIEWS}

    def run(batches):
        import duckdb
        import pyarrow as pa

        from .engine import _sql_text, install_views

        batches = list(batches)
        table = pa.Table.from_batches(batches) if batches else None
        if table is None or not table.num_rows:
            return
        con = duckdb.connect(":memory:", config={"threads": 1})
        try:
            # the views bind to the probe's tables: empty ones with the columns they read
            con.execute("CREATE TABLE measurements (" + ", ".join(f"{n} {t}" for n, t in AGG_MEASUREMENT_COLUMNS) + ")")
            con.execute(_sql_text("00_verdicts.sql"))
            install_views(con)
            # then agg_tally is the sums: the same agg_counts and views run over them
            columns = con.execute("DESCRIBE agg_tally").fetchall()
            con.register("_s_rows", table)
            select = ", ".join(f"CAST({name} AS {kind}) AS {name}" for name, kind, *_rest in columns)
            con.execute(f"CREATE TABLE _s_tally AS SELECT {select} FROM _s_rows")
            con.execute("CREATE OR REPLACE VIEW agg_tally AS SELECT * FROM _s_tally")
            counts = []
            for view in views:
                n = con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
                counts.append(n)
                if not n:
                    continue
                folder = f"{out}/{view}"
                if layouts[view]:
                    con.execute(f"COPY (SELECT * FROM {view} ORDER BY ALL) TO {_q(folder)} (FORMAT PARQUET, "
                                f"PARTITION_BY ({', '.join(layouts[view])}), APPEND, FILENAME_PATTERN 'part-{{uuid}}')")
                else:
                    if _is_local(folder):
                        Path(_local(folder)).mkdir(parents=True, exist_ok=True)
                    con.execute(f"COPY (SELECT * FROM {view} ORDER BY ALL) TO {_q(f'{folder}/part-{uuid.uuid4().hex}.parquet')}"
                                " (FORMAT PARQUET)")
            yield pa.record_batch([pa.array(list(views)), pa.array(counts, pa.int64())], names=["view", "rows"])
        finally:
            con.close()
    return run


def aggregate(spark, out: str) -> dict[str, int]:
    """agg_asn, agg_domain, agg_category over every measurement and verdict: each verdict task wrote
    its measurements' agg_tally rows (OUT/_tally/); Spark sums them by grain and key (one shuffle of
    the tallies, not of the measurements) and DuckDB runs 90_aggregates.sql's views over the sums."""
    from pyspark.sql import functions as F

    if _is_local(out):
        for view, _key, _layout in GLOBAL_VIEWS:
            shutil.rmtree(Path(_local(out)) / view, ignore_errors=True)
    tally = spark.read.parquet(f"{out}/{TALLY}")
    counted = [c for c in tally.columns if c not in TALLY_KEYS]
    sums = tally.groupBy(*TALLY_KEYS).agg(*[F.sum(c).alias(c) for c in counted])
    counts: dict[str, int] = {}
    for r in sums.mapInArrow(_aggregate_partition(out), "view string, rows long").collect():
        counts[r["view"]] = counts.get(r["view"], 0) + r["rows"]
    if _is_local(out):
        shutil.rmtree(Path(_local(out)) / TALLY, ignore_errors=True)
    return counts


# --- The whole run -------------------------------------------------------------------


def run(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    master: str | None = None,
    public_networks: Iterable[str] = (),
    fingerprints_dir: str | os.PathLike | None = None,
    asn_db: str | os.PathLike | None = None,
    schema_sql: str | None = None,
    tables: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    spark=None,
    memory_limit: str | None = None,
    task_size: int = 100_000,
) -> dict[str, Any]:
    """Verdicts and aggregates for the Parquet layout under ``input_dir``, written under ``out_dir``.

    ``schema_sql``: the probe's schema (probes.schema.SCHEMA_SQL, passed by the CLI: analysis never
    imports probes), so that each task's database has the exact tables and types of a Vantage
    database, empty tables included. ``progress(done, total)``: partitions judged so far. ``spark``:
    a session to use (else one is started on ``master`` and stopped at the end). Returns a summary:
    analysed, partitions, tasks, verdict counts (as engine.summary), seconds per stage."""
    from . import fingerprints as fp
    from .engine import public_policy

    root, out = str(input_dir).rstrip("/"), str(out_dir).rstrip("/")
    same = (os.path.realpath(_local(root)) == os.path.realpath(_local(out))) if _is_local(root) and _is_local(out) else root == out
    if same:
        raise AnalysisError("--out must be another folder than --input")
    public_policy(public_networks)  # a bad CIDR is one line, before Spark starts
    if fingerprints_dir is not None:
        fingerprints_dir = os.path.abspath(fingerprints_dir)
    fps_version = fp.load(fingerprints_dir).version
    names = tables or input_tables(root)
    if _is_local(root):
        root = str(Path(_local(root)).resolve())
    if _is_local(out):
        out = str(Path(_local(out)).resolve())
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AnalysisError(f"cannot create {out}: {exc.strerror}") from None
    own = spark is None
    started = time.monotonic()
    if own:
        spark = session(master)
    try:
        sc = spark.sparkContext
        t0 = time.monotonic()
        tasks, asns = plan(spark, root, names, task_size)
        planned = time.monotonic() - t0
        options = sc.broadcast({
            "public_networks": list(public_networks) or None, "fingerprints_dir": fingerprints_dir,
            "asn_db": os.path.abspath(asn_db) if asn_db else None, "schema_sql": schema_sql, "asns": asns,
            "memory_limit": memory_limit or os.environ.get("VANTAGE_ANALYZE_MEMORY")})
        if _is_local(out):
            for name in ("verdicts", TALLY) + PARTITION_VIEWS:
                shutil.rmtree(Path(out) / name, ignore_errors=True)
        t0 = time.monotonic()
        results = _judge(sc, tasks, out, options, progress) if tasks else []
        judged = time.monotonic() - t0
        t0 = time.monotonic()
        agg = aggregate(spark, out) if tasks else {}
        aggregated = time.monotonic() - t0
        options.destroy()
    finally:
        if own:
            spark.stop()
    totals: dict[tuple, list[int]] = {}
    for result in results:
        for status, layer, method, n, confirmed in result["counts"]:
            t = totals.setdefault((status, layer, method), [0, 0])
            t[0] += n
            t[1] += confirmed
    verdicts = [{"status": s, "layer": l, "method": m, "count": n, "confirmed": c}
                for (s, l, m), (n, c) in sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0][0] or "", kv[0][1] or "",
                                                                              kv[0][2] or ""))]
    return {"analysed": sum(n for n, _c in totals.values()), "partitions": sum(len(t.parts) for t in tasks),
            "tasks": len(tasks), "context_measurements": sum(r["context"] for r in results),
            "fingerprint_set": fps_version, "verdicts": verdicts, "aggregates": agg,
            "seconds": {"plan": round(planned, 2), "verdicts": round(judged, 2), "aggregates": round(aggregated, 2),
                        "total": round(time.monotonic() - started, 2)},
            "output": out}


def _judge(sc, tasks: list[Task], out: str, options, progress) -> list[dict]:
    """One Spark task per Task (one slice each, largest first); progress from Spark's status tracker."""
    import threading

    total = sum(len(t.parts) for t in tasks)
    sizes = [len(t.parts) for t in tasks]
    group = f"vantage-{uuid.uuid4().hex[:8]}"
    box: dict[str, Any] = {}

    def work():
        try:
            sc.setJobGroup(group, "vantage analyze: verdicts")
            box["results"] = (sc.parallelize(tasks, len(tasks))
                              .map(lambda t: run_task(t, out, options.value)).collect())
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    tracker = sc.statusTracker()
    last = -1
    while thread.is_alive():
        thread.join(0.5)
        if progress is None:
            continue
        done = 0
        for job in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job)
            for stage in (info.stageIds if info else ()):
                s = tracker.getStageInfo(stage)
                if s:
                    done = max(done, s.numCompletedTasks)
        # tasks finish largest first, roughly: count partitions of the finished slices
        parts = sum(sizes[:done]) if done < len(sizes) else total
        if parts != last:
            progress(parts, total)
            last = parts
    if "error" in box:
        error = box["error"]
        if isinstance(error, AnalysisError):
            raise error
        text = str(error)
        for line in text.splitlines():  # a task's AnalysisError comes back inside Spark's report
            if "AnalysisError:" in line:
                raise AnalysisError(line.split("AnalysisError:", 1)[1].strip()) from None
        raise error
    if progress is not None and last != total:
        progress(total, total)
    return box["results"]
