"""Benchmark `vantage analyze --engine spark` against the local DuckDB analysis, side by side.

For each size (default 1M and 10M synthetic measurements, bench/analyze_bench.py's
generator: 80% ok, nine kinds of anomaly, runs of 1,000 measurements cycling
through five countries over ~35 days per million), in one run:

1. generate the DuckDB database; export it with `vantage export parquet`'s code
   (hive partitions by day and country);
2. local: `analysis.engine.analyze` on the database, in a child process: 2 threads
   and DuckDB memory limit 1600MB (bench/analyze_bench.py's setting); a size that
   runs out of it is recorded and run again with a limit of 1 GB, then 1.6 GB, per
   million measurements;
3. Spark: `analysis.spark.run` on the export, master local[2], in a child
   process (driver JVM, Python workers, DuckDB in each task);

each child's wall time and the peak of the summed RSS of its whole process
tree (sampled every 0.2 s from /proc: the JVM and its Python workers count),
and the machine's load average while it ran (sampled every 5 s: the machine is
shared). The verdict counts of both are compared. Writes bench/results/spark.json
after every step (a size cut short keeps what finished).

    python bench/spark_bench.py [--sizes 1000000,10000000] [--work /tmp/vantage-spark-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VANTAGE_SHARED") or ROOT.parent / "shared")
FINGERPRINTS = os.environ.get("VANTAGE_FINGERPRINTS_DIR", str(SHARED / "data" / "fingerprints"))
PUBLIC = ["198.18.0.0/15"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class ChildFailed(Exception):
    pass


def _run_child(args: list[str]) -> tuple[dict, float, float, dict]:
    """Run ``args``; (its JSON output, wall seconds, peak tree RSS in MB, load average while it ran)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    loads: list[float] = []

    def sample():
        last = 0.0
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            if time.perf_counter() - last >= 5:
                loads.append(os.getloadavg()[0])
                last = time.perf_counter()
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    load = {"min": round(min(loads), 1), "mean": round(sum(loads) / len(loads), 1), "max": round(max(loads), 1)} if loads else {}
    if proc.returncode:
        lines = [line for line in err.strip().splitlines() if "Error" in line] or err.strip().splitlines() or [""]
        raise ChildFailed(f"failed ({proc.returncode}) after {wall:.0f} s, peak {peak[0] / 2**20:.0f} MB: {lines[-1][:200]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak[0] / 2**20, load


def _log(n: int, text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{n:,}] {text} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def child_local(db: str, memory_limit: str, threads: str) -> dict:
    from analysis.db import connect
    from analysis.engine import analyze

    con = connect(db, memory_limit=memory_limit, threads=int(threads))
    con.execute("SET preserve_insertion_order = false")
    started = time.perf_counter()
    count = analyze(con, public_networks=PUBLIC, fingerprints_dir=FINGERPRINTS)
    seconds = time.perf_counter() - started
    counts = dict(con.execute("SELECT coalesce(method, status), count(*) FROM verdicts GROUP BY ALL").fetchall())
    spilled = con.execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchone()[0]
    return {"analysed": count, "seconds": round(seconds, 2), "verdicts": counts, "temp_files_mb_at_end": round(spilled / 2**20)}


def child_spark(export: str, out: str) -> dict:
    import duckdb

    from analysis import spark
    from probes.schema import SCHEMA_SQL

    started = time.perf_counter()
    session = spark.session("local[2]")
    start_up = time.perf_counter() - started
    result = spark.run(export, out, spark=session, public_networks=PUBLIC, fingerprints_dir=FINGERPRINTS,
                       schema_sql=SCHEMA_SQL)
    session.stop()
    counts = dict(duckdb.connect().execute(
        f"SELECT coalesce(method, status), count(*) FROM read_parquet('{out}/verdicts/*/*/*.parquet') GROUP BY ALL").fetchall())
    return {"analysed": result["analysed"], "seconds": round(time.perf_counter() - started, 2),
            "session_start_seconds": round(start_up, 2), "stages": result["seconds"], "partitions": result["partitions"],
            "tasks": result["tasks"], "context_measurements": result["context_measurements"], "verdicts": counts}


def one_size(n: int, work: Path, record: Callable[[dict], None]) -> dict:
    """Generate, export and analyse ``n`` measurements with both engines; ``record(result)`` after each step."""
    import duckdb

    from analysis.export import export_parquet

    spec_path = ROOT / "bench" / "analyze_bench.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("_analyze_bench", spec_path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    work.mkdir(parents=True, exist_ok=True)
    db, export, out = work / f"bench-{n}.duckdb", work / f"export-{n}", work / f"out-{n}"
    for path in (export, out):
        shutil.rmtree(path, ignore_errors=True)
    result: dict = {"measurements": n, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_at_start": _uptime()}
    _log(n, "generating")
    generated = bench.generate(db, n)
    _log(n, "exporting to Parquet")
    started = time.perf_counter()
    con = duckdb.connect(str(db))
    con.execute("SET memory_limit = '4GB'")
    export_parquet(con, export)
    con.close()
    exported = time.perf_counter() - started
    parquet_mb = sum(p.stat().st_size for p in export.rglob("*.parquet")) / 2**20
    result.update({"generate_seconds": round(generated, 1), "db_mb": round(db.stat().st_size / 2**20, 1),
                   "export_seconds": round(exported, 1), "parquet_mb": round(parquet_mb, 1)})
    # bench/analyze_bench.py's 1600MB and 2 threads; a size that runs out of it is recorded, then run
    # with 1 GB per million measurements, then 1.6 GB per million (one statement of 10_scope.sql keeps
    # four hash tables in memory at once: docs/benchmarks.md)
    attempts = [("1600MB", 2), (f"{max(2, -(-n // 1_000_000))}GB", 2), (f"{max(3, -(-n * 16 // 10_000_000))}GB", 2)]
    failures, local = [], None
    for memory, threads in attempts:
        _log(n, f"local DuckDB analysis, {threads} threads, memory limit {memory}")
        try:
            local, local_wall, local_peak, local_load = _run_child(
                [sys.executable, __file__, "--child-local", str(db), memory, str(threads)])
            break
        except ChildFailed as exc:
            _log(n, f"local, {threads} threads, {memory}: {exc}")
            failures.append({"memory_limit": memory, "threads": threads, "error": str(exc)})
    if local is not None:
        _log(n, f"local: {local_wall:.1f} s, {local_peak:.0f} MB")
        result["duckdb_local"] = {"wall_seconds": round(local_wall, 1), "analyze_seconds": local["seconds"],
                                  "peak_rss_mb": round(local_peak), "threads": threads, "memory_limit": memory,
                                  "temp_files_mb_at_end": local["temp_files_mb_at_end"], "load_average_1min": local_load,
                                  "failed_first": failures}
    else:
        result["duckdb_local"] = {"failed": failures}
    record(result)
    _log(n, "Spark local[2]")
    spark, spark_wall, spark_peak, spark_load = _run_child([sys.executable, __file__, "--child-spark", str(export), str(out)])
    _log(n, f"spark: {spark_wall:.1f} s, {spark_peak:.0f} MB")
    result["spark_local2"] = {
        "wall_seconds": round(spark_wall, 1), "run_seconds": spark["seconds"],
        "session_start_seconds": spark["session_start_seconds"], "stages": spark["stages"],
        "peak_rss_mb": round(spark_peak), "partitions": spark["partitions"], "tasks": spark["tasks"],
        "context_measurements": spark["context_measurements"], "load_average_1min": spark_load}
    result["same_verdict_counts"] = local is not None and local["verdicts"] == spark["verdicts"]
    result["verdicts"] = spark["verdicts"]
    result["load_at_end"] = _uptime()
    record(result)
    db.unlink(missing_ok=True)
    shutil.rmtree(export, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _uptime() -> str:
    """`uptime`'s load averages (1, 5, 15 minutes)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vantage-spark-bench"))
    parser.add_argument("--append", action="store_true", help="add to the runs in bench/results/spark.json")
    parser.add_argument("--child-local", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-spark", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_local:
        print(json.dumps(child_local(*args.child_local)))
        return
    if args.child_spark:
        print(json.dumps(child_spark(*args.child_spark)))
        return
    target = ROOT / "bench" / "results" / "spark.json"
    runs = json.loads(target.read_text())["runs"] if args.append and target.is_file() else []
    done = list(runs)

    def record(result: dict) -> None:
        current = done + [result]
        summary = {"machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * PAGE // 2**30} GB RAM, shared",
                   "master": "local[2]", "runs": current}
        finished = [r for r in current if "spark_local2" in r]
        if len(finished) > 1:
            a, b = finished[0], finished[-1]
            ratio = lambda x, y: round(y / x, 2) if x and y else None  # noqa: E731
            summary["spark_growth"] = {
                "from": a["measurements"], "to": b["measurements"],
                "measurements_ratio": ratio(a["measurements"], b["measurements"]),
                "spark_run_seconds_ratio": ratio(a["spark_local2"]["run_seconds"], b["spark_local2"]["run_seconds"]),
                "spark_verdicts_seconds_ratio": ratio(a["spark_local2"]["stages"]["verdicts"], b["spark_local2"]["stages"]["verdicts"]),
                "spark_aggregates_seconds_ratio": ratio(a["spark_local2"]["stages"]["aggregates"], b["spark_local2"]["stages"]["aggregates"]),
                "duckdb_seconds_ratio": ratio(a.get("duckdb_local", {}).get("analyze_seconds"),
                                              b.get("duckdb_local", {}).get("analyze_seconds"))}
        target.write_text(json.dumps(summary, indent=2) + "\n")

    for n in (int(s) for s in args.sizes.split(",")):
        done.append(one_size(n, args.work, record))
    print(target.read_text())


if __name__ == "__main__":
    main()
