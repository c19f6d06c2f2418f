"""The CPU DuckDB itself needs to store imported OONI measurements: the floor
under any `vantage import ooni`, whatever its parser and flattener cost.

The 50 QA measurements (Web Connectivity 0.5.28) are converted and flattened
once, exactly as the import does (``record_from_ooni``, then
``probes.store.arrow_tables``: 17 rows in six tables and the 7 KB record per
measurement), into Arrow tables of 1,000 measurements; copies with distinct
measurement ids are then inserted into a fresh database of our schema, and
the process's CPU time (DuckDB's threads included) is divided by the
measurements stored. Nothing is parsed or flattened while the clock runs:
what is left is DuckDB's insert, commit and checkpoint.

    python bench/ooni_store_floor.py [--count 40000] [--repeat 2] [--out bench/results/ooni_store_floor.json]

Each variant runs in its own process (a fresh DuckDB). Issue 12 asks for
15,000 measurements/s on 2 cores: 2 s of CPU per second / 15,000 = 133 µs of
CPU per measurement for reading, parsing, flattening and storing together;
``max_per_second_2_cores`` is what the store alone would allow with a reader
that cost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 1000  # measurements per flattened batch, as the import's reader sends them

# name: (measurements per INSERT statement, DuckDB memory limit, store the record? (True, False or
# "unchecked": as Arrow's JSON type), primary key?, note)
VARIANTS = {
    "import": (1000, "256MB", True, True, "as `vantage import ooni` stores today: batches of 1,000, 256 MB pool"),
    "large_statements": (10000, "2GB", True, True, "10,000 measurements per statement, 2 GB pool"),
    "large_record_unchecked": (10000, "2GB", "unchecked", True,
                               "the record handed over as Arrow's JSON type (DuckDB does not validate it again)"),
    "large_no_record": (10000, "2GB", False, True, "the same without measurements.record (7 KB of JSON each)"),
    "large_no_record_no_key": (10000, "2GB", False, False,
                               "and without the primary key on measurements.measurement_id "
                               "(plain INSERTs: no duplicates to skip, no RETURNING)"),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _flattened_batch() -> dict:
    from bench.ooni_import_bench import samples
    from probes import store
    from probes.ooni_import import record_from_ooni

    docs = samples("qa")
    records = []
    for n in range(BATCH):
        doc = dict(docs[n % len(docs)])
        doc.pop("measurement_uid", None)
        doc["report_id"] = f"floor-{n}"
        records.append((record_from_ooni(doc), None))
    return store.arrow_tables(records)


def _copies(tables: dict, count: int, per_statement: int, keep_record: bool) -> list[dict]:
    """``count`` measurements as statements of ``per_statement``: the batch
    again and again, its measurement ids suffixed to be distinct."""
    import pyarrow as pa
    import pyarrow.compute as pc

    batches = []
    for copy in range(count // BATCH):
        out = {}
        for table, data in tables.items():
            at = data.column_names.index("measurement_id")
            ids = pc.binary_join_element_wise(data.column(at), pa.scalar(f"-{copy}"), "")
            data = data.set_column(at, "measurement_id", ids)
            if table == "measurements" and not keep_record:
                data = data.drop_columns(["record"])
            elif table == "measurements" and keep_record == "unchecked":
                at = data.column_names.index("record")
                data = data.set_column(at, "record", data.column(at).cast(pa.json_(pa.string())))
            out[table] = data
        batches.append(out)
    group = max(1, per_statement // BATCH)
    return [{table: pa.concat_tables([b[table] for b in batches[i:i + group]]) for table in batches[0]}
            for i in range(0, len(batches), group)]


def _plain_insert(con, tables: dict) -> int:
    con.execute("BEGIN")
    for table, data in tables.items():
        con.register("_floor", data)
        con.execute(f"INSERT INTO {table} ({', '.join(data.column_names)}) SELECT * FROM _floor")
        con.unregister("_floor")
    con.execute("COMMIT")
    return tables["measurements"].num_rows


def child(variant: str, count: int, db: str) -> dict:
    from probes import store

    per_statement, memory, keep_record, key, _note = VARIANTS[variant]
    statements = _copies(_flattened_batch(), count, per_statement, keep_record)
    con = store.connect(db, threads=2)
    if not key:
        con.execute("ALTER TABLE measurements RENAME TO measurements_keyed")
        con.execute("CREATE TABLE measurements AS SELECT * FROM measurements_keyed LIMIT 0")
    rows = sum(t.num_rows for s in statements for t in s.values())
    t0, c0 = time.perf_counter(), _cpu()
    stored = 0
    with store.memory_limit(con, memory):
        for tables in statements:
            if key:
                stored += store.insert_tables(con, tables)  # the import's own writer
            else:  # no key to ignore duplicates by: plain inserts, one transaction a statement
                stored += _plain_insert(con, tables)
        con.execute("CHECKPOINT")
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    con.close()
    return {"variant": variant, "note": VARIANTS[variant][4], "measurements": stored, "rows": rows,
            "cpu_us_per_measurement": round(cpu * 1e6 / stored, 1),
            "wall_us_per_measurement": round(seconds * 1e6 / stored, 1),
            "max_per_second_2_cores": round(2 / (cpu / stored)),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "db_mb": round(os.path.getsize(db) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40000, help="measurements stored per variant")
    parser.add_argument("--variant", choices=list(VARIANTS), action="append", help="(repeatable; default all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every variant (the machine's noise shows)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ooni_store_floor.json"))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.count, args.child[1])))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="vantage-store-floor-") as tmp:
        for n, variant in enumerate(v for _ in range(args.repeat) for v in args.variant or list(VARIANTS)):
            load = round(os.getloadavg()[0], 2)
            db = Path(tmp) / f"{n}-{variant}.duckdb"  # a fresh database each run
            out = subprocess.run([sys.executable, __file__, "--count", str(args.count), "--child", variant, str(db)],
                                 capture_output=True, text=True, check=True)
            db.unlink()
            result = json.loads(out.stdout.strip().splitlines()[-1]) | {"load_average_1m_at_start": load}
            print(json.dumps(result), flush=True)
            results.append(result)
    report = {"runs": results, "cpus": os.cpu_count(), "python": platform.python_version(),
              "budget_cpu_us_per_measurement_at_15000_on_2_cores": round(2e6 / 15000, 1)}
    import duckdb

    report["duckdb"] = duckdb.__version__
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
