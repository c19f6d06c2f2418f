"""Benchmark `vantage analyze --engine spark` against the local DuckDB analysis, side by side.

For each size (default 1M and 10M synthetic measurements, bench/analyze_bench.py's
generator: 80% ok, nine kinds of anomaly, runs of 1,000 measurements cycling
through five countries over ~35 days per million), in one run:

1. generate the DuckDB database; export it with `vantage export parquet`'s code
   (hive partitions by day and country);
2. local: `analysis.engine.analyze` on the database, 2 threads, DuckDB memory
   limit 1600MB (bench/analyze_bench.py's setting), in a child process;
3. Spark: `analysis.spark.run` on the export, master local[2], in a child
   process (driver JVM, Python workers, DuckDB in each task);

each child's wall time and the peak of the summed RSS of its whole process
tree (sampled every 0.2 s from /proc: the JVM and its Python workers count).
The verdict counts of both are compared. Writes bench/results/spark.json.

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


def _run_child(args: list[str]) -> tuple[dict, float, float]:
    """Run ``args``; (its JSON output, wall seconds, peak tree RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode:
        raise ChildFailed(f"{args[2:4]} failed ({proc.returncode}): {err.strip().splitlines()[-6] if err.strip() else ''}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak[0] / 2**20


def child_local(db: str, memory_limit: str) -> dict:
    from analysis.db import connect
    from analysis.engine import analyze

    con = connect(db, memory_limit=memory_limit, threads=2)
    con.execute("SET preserve_insertion_order = false")
    started = time.perf_counter()
    count = analyze(con, public_networks=PUBLIC, fingerprints_dir=FINGERPRINTS)
    seconds = time.perf_counter() - started
    counts = dict(con.execute("SELECT coalesce(method, status), count(*) FROM verdicts GROUP BY ALL").fetchall())
    return {"analysed": count, "seconds": round(seconds, 2), "verdicts": counts}


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


def one_size(n: int, work: Path) -> dict:
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
    print(f"[{n:,}] generating", file=sys.stderr, flush=True)
    generated = bench.generate(db, n)
    print(f"[{n:,}] exporting to Parquet", file=sys.stderr, flush=True)
    started = time.perf_counter()
    con = duckdb.connect(str(db))
    con.execute("SET memory_limit = '4GB'")
    export_parquet(con, export)
    con.close()
    exported = time.perf_counter() - started
    parquet_mb = sum(p.stat().st_size for p in export.rglob("*.parquet")) / 2**20
    print(f"[{n:,}] local DuckDB analysis", file=sys.stderr, flush=True)
    # bench/analyze_bench.py's 1600MB; a size that runs out of it is recorded and run again with 6GB
    failures = []
    for memory in ("1600MB", "6GB"):
        try:
            local, local_wall, local_peak = _run_child([sys.executable, __file__, "--child-local", str(db), memory])
            break
        except ChildFailed as exc:
            print(f"[{n:,}] local with {memory}: {exc}", file=sys.stderr, flush=True)
            failures.append({"memory_limit": memory, "error": str(exc)[-300:]})
    print(f"[{n:,}] local: {local_wall:.1f} s, {local_peak:.0f} MB; Spark local[2]", file=sys.stderr, flush=True)
    spark, spark_wall, spark_peak = _run_child([sys.executable, __file__, "--child-spark", str(export), str(out)])
    print(f"[{n:,}] spark: {spark_wall:.1f} s, {spark_peak:.0f} MB", file=sys.stderr, flush=True)
    result = {
        "measurements": n, "generate_seconds": round(generated, 1), "db_mb": round(db.stat().st_size / 2**20, 1),
        "export_seconds": round(exported, 1), "parquet_mb": round(parquet_mb, 1),
        "duckdb_local": {"wall_seconds": round(local_wall, 1), "analyze_seconds": local["seconds"],
                         "peak_rss_mb": round(local_peak), "threads": 2, "memory_limit": memory,
                         "failed_first": failures},
        "spark_local2": {"wall_seconds": round(spark_wall, 1), "run_seconds": spark["seconds"],
                         "session_start_seconds": spark["session_start_seconds"], "stages": spark["stages"],
                         "peak_rss_mb": round(spark_peak), "partitions": spark["partitions"], "tasks": spark["tasks"],
                         "context_measurements": spark["context_measurements"]},
        "same_verdict_counts": local["verdicts"] == spark["verdicts"],
        "verdicts": local["verdicts"],
    }
    db.unlink(missing_ok=True)
    shutil.rmtree(export, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vantage-spark-bench"))
    parser.add_argument("--append", action="store_true", help="add to the runs in bench/results/spark.json")
    parser.add_argument("--child-local", nargs=2, help=argparse.SUPPRESS)
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
    for n in (int(s) for s in args.sizes.split(",")):
        runs.append(one_size(n, args.work))
        summary = {"machine": f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}",
                   "master": "local[2]", "runs": runs}
        if len(runs) > 1:
            a, b = runs[0], runs[-1]
            summary["spark_growth"] = {
                "measurements_ratio": round(b["measurements"] / a["measurements"], 2),
                "spark_run_seconds_ratio": round(b["spark_local2"]["run_seconds"] / a["spark_local2"]["run_seconds"], 2),
                "duckdb_seconds_ratio": round(b["duckdb_local"]["analyze_seconds"] / a["duckdb_local"]["analyze_seconds"], 2)}
        target.write_text(json.dumps(summary, indent=2) + "\n")
    print(target.read_text())


if __name__ == "__main__":
    main()
