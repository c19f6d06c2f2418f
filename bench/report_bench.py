"""Benchmark `vantage report` (analysis.report.build) on synthetic measurements.

Generates N measurements (default 1,000,000) of one country with their
verdicts straight into the DuckDB tables with SQL (generate_series, no Python
loops): 12 networks, 240 probe runs, 2,000 sites, 60 days. Mix: sites 0–99 are
DNS-blocked (NXDOMAIN) on four networks from a day between 20 and 29 March
(change points), sites 100–149 serve a confirmed blockpage on three networks,
sites 150–159 are throttled (with timed downloads) on one network, sites
160–199 TLS-reset on two networks until a day in April (blocking stops), 3%
inconclusive, 1% down, the rest ok. Then, in a fresh process limited to 2
threads and the analysis's memory limit, times build() and records peak RSS.
Writes bench/results/report.json.

    python bench/report_bench.py [--n 1000000] [--db /tmp/vantage-report-bench.duckdb]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.analyze_bench import generate, run_child, write_result  # noqa: E402  (one generator, one child runner)

GENERATE = """
CREATE OR REPLACE TEMP TABLE g AS
SELECT i, 'M' || lpad(i::VARCHAR, 9, '0') AS mid,
       i % 12 AS net, (i // 12) % 2000 AS site, ((i // 24000) * 7 + (i // 12) % 2000) % 60 AS d,
       (i // 24000) % 20 AS vp
FROM generate_series(0, {n} - 1) t(i);

CREATE OR REPLACE TEMP TABLE k AS
SELECT *, CASE
    WHEN (i * 2654435761) % 100 < 3 THEN 'inconclusive'
    WHEN (i * 2654435761) % 100 = 3 THEN 'down'
    WHEN site < 100 AND net < 4 AND d >= 19 + site % 10 THEN 'dns'
    WHEN site BETWEEN 100 AND 149 AND net BETWEEN 4 AND 6 THEN 'blockpage'
    WHEN site BETWEEN 150 AND 159 AND net = 7 THEN 'throttle'
    WHEN site BETWEEN 160 AND 199 AND net BETWEEN 8 AND 9 AND d < 35 + site % 10 THEN 'tls'
    ELSE 'ok' END AS kind
FROM g;

INSERT INTO measurements (measurement_id, run_id, test_name, test_version, input, domain, scheme, port, category_code,
                          start_time, runtime, probe_cc, probe_asn, resolver_asn, software_name, software_version,
                          control_failure, control_helper, probe_network_ok, record)
SELECT mid, 'run-' || net || '-' || vp, CASE WHEN kind = 'throttle' THEN 'throttling' ELSE 'web_connectivity' END, '0.1.0',
       'https://site' || site || '.example/', 'site' || site || '.example', 'https', 443,
       ['NEWS', 'POLR', 'HUMR', 'GRP', 'COMT', 'MMED'][1 + site % 6],
       TIMESTAMP '2025-03-01' + INTERVAL (d) DAY + INTERVAL (i % 86400) SECOND, 2.5,
       'ZZ', 'AS' || (64500 + net), 'AS64496', 'vantage', '0.1.0', NULL, 'https://helper.example', true, NULL
FROM k;

INSERT INTO verdicts
SELECT mid, 'https://site' || site || '.example/',
       CASE kind WHEN 'ok' THEN 'ok' WHEN 'inconclusive' THEN 'inconclusive' WHEN 'down' THEN 'down'
                 WHEN 'throttle' THEN 'throttled' ELSE 'blocked' END,
       CASE kind WHEN 'dns' THEN 'dns' WHEN 'blockpage' THEN 'http' WHEN 'tls' THEN 'tls' END,
       CASE kind WHEN 'dns' THEN 'dns.nxdomain' WHEN 'blockpage' THEN 'http.blockpage' WHEN 'tls' THEN 'tls.reset'
                 WHEN 'throttle' THEN 'throttle.sni' END,
       CASE WHEN kind = 'inconclusive' THEN 0 ELSE 0.9 END, kind = 'blockpage',
       CASE kind WHEN 'blockpage' THEN '{{"rule": "http_blockpage_fingerprint", "compared": {{"fingerprint": "censoredplanet:bench", "probe_title": "Blocked"}}, "fingerprint_set": "fp-bench"}}'
                 ELSE '{{"rule": "bench", "compared": {{}}, "fingerprint_set": "fp-bench"}}' END,
       TIMESTAMP '2025-05-01'
FROM k;

INSERT INTO throughput_samples (measurement_id, side, variant, attempt, ip, server_name, bytes, seconds, kbit_per_s, failure)
SELECT mid, s.side, s.variant, a.attempt, '203.0.113.' || site % 250, 'site' || site || '.example', 1000000, 1.0,
       CASE WHEN s.variant = 'target' THEN 150.0 + a.attempt ELSE 9000.0 + a.attempt END, NULL
FROM k, (VALUES ('probe', 'target'), ('probe', 'scrambled'), ('control', 'helper')) s(side, variant),
     (VALUES (0), (1)) a(attempt)
WHERE kind = 'throttle';

DROP TABLE k;
DROP TABLE g;
"""


def measure(db: Path, out: Path, threads: int, memory_limit: str) -> dict:
    """Runs in a child process so the RSS is the report's alone."""
    from analysis.db import connect
    from analysis.report import build

    if out.exists():
        shutil.rmtree(out)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    con = connect(db, memory_limit=memory_limit, threads=threads)  # as `vantage report` opens it
    started = time.perf_counter()
    result = build(con, country="ZZ", out_dir=out)
    seconds = time.perf_counter() - started
    con.close()
    sizes = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
    return {"report_seconds": round(seconds, 2), "measurements": result.measurements, "networks": result.networks,
            "findings": result.findings, "change_points": result.changes,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mb": round(rss_before / 1024, 1),
            "index_html_kb": round(sizes["index.html"] / 1024, 1),
            "data_mb": round(sum(v for k, v in sizes.items() if k.endswith((".csv", ".parquet"))) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/vantage-report-bench.duckdb"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/vantage-report-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.db, args.out, args.threads, args.memory_limit)))
        return
    gen = generate(args.db, args.n, GENERATE, analysis_tables=True)
    result = run_child(__file__, args, "--db", str(args.db), "--out", str(args.out))
    result.update({"generated": args.n, "threads": args.threads, "memory_limit": args.memory_limit,
                   "generate_seconds": round(gen, 1), "db_mb": round(args.db.stat().st_size / 2**20, 1)})
    write_result("report", result)


if __name__ == "__main__":
    main()
