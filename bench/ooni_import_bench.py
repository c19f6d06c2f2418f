"""How fast `vantage import ooni` parses and stores OONI measurements.

Replicates every Web Connectivity measurement of the shared folder
(../shared/data/ooni: the 50 QA ones and the real ones, 0.0.1 to 0.5.28)
into one large ``.jsonl.gz`` (distinct report ids, no measurement_uid, so
every copy is a new measurement), then imports it into a fresh DuckDB file in
a child process (``probes.ooni_import.import_ooni``, as the CLI does) and
reports measurements per second parsed and stored, the child's peak RSS and
the largest of its worker processes' (``worker_peak_rss_mb``: each worker's).

    python bench/ooni_import_bench.py [--count 200000] [--threads 2] [--workers 2] [--out bench/results/ooni_import.json]

Goal (issue 12): at least 15,000 measurements/s on 2 cores, memory bounded
whatever the file size (peak RSS measured at two sizes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("VANTAGE_SHARED") or ROOT.parent / "shared")

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from probes.store import connect
from probes.ooni_import import MAX_WORKERS, _cores, import_ooni
con = connect(sys.argv[3])
con.execute(f"SET threads = {int(sys.argv[4])}")
workers = int(sys.argv[5]) or min(MAX_WORKERS, _cores())
t0 = time.perf_counter()
summary = import_ooni(con, [sys.argv[2]], workers=workers)
seconds = time.perf_counter() - t0
con.close()
print(json.dumps({"seconds": seconds, "imported": summary.imported, "bad": summary.bad,
                  "duplicates": summary.duplicates,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers": workers,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def samples(which: str = "qa") -> list[dict]:
    """``qa``: the 50 QA measurements (Web Connectivity 0.5.28, 8 KB of JSON
    each on average: what oonidata's figure in issue 12 is about); ``all``:
    every Web Connectivity measurement of the shared folder (37 KB on average,
    two of them 0.8 MB youtube pages with their bodies)."""
    from probes.ooni_import import iter_documents, iter_files

    found = []
    folder = SHARED / "data" / "ooni" / ("ooni-data-wc05_qa" if which == "qa" else "")
    for path in iter_files([folder]):
        for _line, doc in iter_documents(path):
            if isinstance(doc, dict) and doc.get("test_name") == "web_connectivity" and "test_keys" in doc:
                found.append(doc)
    return found


def make_file(path: Path, count: int, which: str) -> tuple[int, int]:
    """``count`` measurements, copies of the samples with distinct report ids.
    Returns (bytes of JSON, bytes on disk)."""
    base = samples(which)
    lines = []
    for doc in base:
        doc = dict(doc)
        doc.pop("measurement_uid", None)
        doc["report_id"] = (doc.get("report_id") or "r") + "_{n}"
        lines.append(json.dumps(doc, ensure_ascii=False))
    raw = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as fh:
        for n in range(count):
            template = lines[n % len(lines)]
            # the report id is the one thing that changes: a plain text substitution
            line = template.replace('_{n}"', f'_{n}"', 1)
            raw += len(line) + 1
            fh.write(line + "\n")
    return raw, path.stat().st_size


def run(count: int, threads: int, workdir: Path, which: str, workers: int = 0) -> dict:
    data = workdir / f"ooni-{count}.jsonl.gz"
    t0 = time.perf_counter()
    raw, disk = make_file(data, count, which)
    made = time.perf_counter() - t0
    db = workdir / f"import-{count}.duckdb"
    load = round(os.getloadavg()[0], 2)  # other jobs on the machine lower every figure
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(data), str(db), str(threads), str(workers)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({
        "samples": which, "measurements": count, "per_second": round(result["imported"] / result["seconds"]),
        "seconds": round(result["seconds"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "worker_peak_rss_mb": round(result["worker_peak_rss_mb"], 1),
        "load_average_1m_at_start": load, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "json_mb": round(raw / 1e6, 1), "gz_mb": round(disk / 1e6, 1), "db_mb": round(db.stat().st_size / 1e6, 1),
        "generate_seconds": round(made, 1),
    })
    data.unlink()
    db.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, action="append", help="measurements (repeatable; default 50000 and 200000)")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads (the goal is for 2 cores)")
    parser.add_argument("--samples", choices=("qa", "all"), action="append",
                        help="which measurements to replicate (repeatable; default both)")
    parser.add_argument("--workers", type=int, action="append",
                        help="worker processes (repeatable; default: the import's own choice, one a core)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ooni_import.json"))
    args = parser.parse_args()
    counts = args.count or [50_000, 200_000]
    results = []
    with tempfile.TemporaryDirectory(prefix="vantage-ooni-bench-") as tmp:
        for which in args.samples or ["qa", "all"]:
            for count in counts:
                for workers in args.workers or [0]:
                    result = run(count, args.threads, Path(tmp), which, workers)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    report = {"runs": results, "threads": args.threads, "cpus": os.cpu_count(), "python": platform.python_version(),
              "goal_per_second": 15000}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
