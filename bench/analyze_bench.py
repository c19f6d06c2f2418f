"""Benchmark `analysis.engine.analyze` on synthetic measurements.

Generates N measurements (default 1,000,000) with a realistic mix straight
into the DuckDB tables with SQL (generate_series, no Python loops), then, in a
fresh process limited to 2 threads, times analyze() and a plain scan of the
same tables, and records peak RSS. Writes bench/results/analyze.json.

Mix (share of measurements): 80% ok over https, 4% dynamic pages, 3% DNS
NXDOMAIN, 2% DNS bogon, 2% TCP timeout, 2% TLS reset, 2% plain-http blockpage,
2% down for everyone, 2% no control, 1% offline probe. Every measurement has
probe system+UDP DNS rows, control DNS, TCP/TLS on both sides and HTTP on both
sides where the scenario reaches that far; bodies are ~400 bytes.

    python bench/analyze_bench.py [--n 1000000] [--db /tmp/vantage-bench.duckdb]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The read-only shared folder, as tests/shared.py finds it: VANTAGE_SHARED, else ../shared beside the repository.
SHARED = Path(os.environ.get("VANTAGE_SHARED") or ROOT.parent / "shared")

GENERATE = """
CREATE OR REPLACE TEMP TABLE g AS
SELECT i,
       'M' || lpad(i::VARCHAR, 9, '0') AS mid,
       CASE WHEN i % 100 < 80 THEN 'ok' WHEN i % 100 < 84 THEN 'dynamic' WHEN i % 100 < 87 THEN 'nx'
            WHEN i % 100 < 89 THEN 'bogon' WHEN i % 100 < 91 THEN 'tcp' WHEN i % 100 < 93 THEN 'tls'
            WHEN i % 100 < 95 THEN 'blockpage' WHEN i % 100 < 97 THEN 'down' WHEN i % 100 < 99 THEN 'noctl'
            ELSE 'offline' END AS kind,
       'site' || (i % 20000)::VARCHAR || '.example' AS host,
       '203.0.' || ((i // 250) % 250)::VARCHAR || '.' || (i % 250)::VARCHAR AS ip
FROM generate_series(0, {n} - 1) t(i);

INSERT INTO measurements
SELECT mid, 'run' || (i // 1000)::VARCHAR, 'web_connectivity', '0.1.0',
       CASE WHEN kind = 'blockpage' THEN 'http://' ELSE 'https://' END || host || '/', host,
       CASE WHEN kind = 'blockpage' THEN 'http' ELSE 'https' END, CASE WHEN kind = 'blockpage' THEN 80 ELSE 443 END,
       ['NEWS', 'POLR', 'HUMR', 'GRP', 'COMT'][1 + i % 5],
       TIMESTAMP '2025-01-01' + to_seconds(i * 3), 2.5,
       ['IR', 'RU', 'CN', 'TR', 'DE'][1 + (i // 7) % 5], 'AS' || (64500 + i % 40)::VARCHAR, 'AS64496',
       'vantage', '0.1.0',
       CASE WHEN kind IN ('noctl', 'offline') THEN 'connection_reset' END,
       CASE WHEN kind NOT IN ('noctl', 'offline') THEN 'https://helper.example' END,
       kind <> 'offline', NULL, NULL, NULL  -- record; ooni_blocking, ooni_accessible
FROM g;

-- probe DNS: system + udp (A), control th
INSERT INTO dns_answers
SELECT mid, 'probe', e.txid, e.engine, '192.0.2.53:53', host, 'A', 0,
       CASE WHEN kind = 'nx' THEN 'dns_nxdomain_error' WHEN kind = 'offline' THEN 'network_unreachable' END,
       NULL,
       CASE WHEN kind IN ('nx', 'offline') THEN NULL ELSE 'A' END,
       CASE WHEN kind IN ('nx', 'offline') THEN NULL WHEN kind = 'bogon' AND e.engine = 'system' THEN '10.10.34.34' ELSE ip END,
       300, 0.0, 0.02
FROM g, (VALUES (1, 'system'), (2, 'udp')) e(txid, engine);

INSERT INTO dns_answers
SELECT mid, 'control', NULL, 'th', NULL, NULL, 'ANY', 0, NULL, NULL, 'A', ip, NULL, NULL, NULL
FROM g WHERE kind NOT IN ('noctl', 'offline');

INSERT INTO tcp_connects
SELECT mid, 'probe', 3, CASE WHEN kind = 'bogon' THEN '10.10.34.34' ELSE ip END,
       CASE WHEN kind = 'blockpage' THEN 80 ELSE 443 END,
       kind NOT IN ('tcp', 'down', 'bogon'), CASE WHEN kind IN ('tcp', 'down', 'bogon') THEN 'generic_timeout_error' END, 0.03, 0.05, 0
FROM g WHERE kind NOT IN ('nx', 'offline');

INSERT INTO tcp_connects
SELECT mid, 'control', NULL, ip, CASE WHEN kind = 'blockpage' THEN 80 ELSE 443 END, kind <> 'down',
       CASE WHEN kind = 'down' THEN 'generic_timeout_error' END, NULL, NULL, NULL
FROM g WHERE kind NOT IN ('noctl', 'offline');

INSERT INTO tls_handshakes
SELECT mid, 'probe', 4, ip, 443, host, kind <> 'tls', CASE WHEN kind = 'tls' THEN 'connection_reset' END,
       CASE WHEN kind <> 'tls' THEN 'TLSv1.3' END, NULL, CASE WHEN kind <> 'tls' THEN true END, NULL,
       'CN=' || host, 'CN=Lab CA', NULL, NULL, 0.05, 0.08, 0
FROM g WHERE kind IN ('ok', 'dynamic', 'tls', 'noctl');

INSERT INTO tls_handshakes
SELECT mid, 'control', NULL, ip, 443, host, true, NULL, 'TLSv1.3', NULL, true, NULL, 'CN=' || host, 'CN=Lab CA',
       NULL, NULL, NULL, NULL, NULL
FROM g WHERE kind IN ('ok', 'dynamic', 'tls');

INSERT INTO http_transactions
SELECT mid, 'probe', 5, 0, CASE WHEN kind = 'blockpage' THEN 'http://' ELSE 'https://' END || host || '/', 'GET',
       ip || CASE WHEN kind = 'blockpage' THEN ':80' ELSE ':443' END, NULL, 200,
       '{{"Content-Type": "text/html", "Server": "nginx"}}',
       CASE WHEN kind = 'blockpage' THEN NULL ELSE 'Site ' || (i % 20000)::VARCHAR END,
       CASE WHEN kind = 'blockpage' THEN 92 WHEN kind = 'dynamic' THEN 420 + i % 50 ELSE 400 END, false,
       CASE WHEN kind = 'dynamic' THEN md5(mid) ELSE md5(host) END,
       CASE WHEN kind = 'blockpage' THEN '<html><body>Access to this resource has been restricted by decision of the regulator.</body></html>'
            ELSE '<html><head><title>Site ' || (i % 20000)::VARCHAR || '</title></head><body>' || repeat('lorem ipsum ', 28)
                 || CASE WHEN kind = 'dynamic' THEN mid ELSE '' END || '</body></html>' END,
       0.1, 0.4, 0
FROM g WHERE kind IN ('ok', 'dynamic', 'blockpage', 'noctl');

INSERT INTO http_transactions
SELECT mid, 'control', NULL, 0, 'https://' || host || '/', 'GET', NULL,
       CASE WHEN kind = 'down' THEN 'generic_timeout_error' END, CASE WHEN kind <> 'down' THEN 200 END,
       '{{"Content-Type": "text/html", "Server": "nginx"}}',
       CASE WHEN kind <> 'down' THEN 'Site ' || (i % 20000)::VARCHAR END, CASE WHEN kind <> 'down' THEN 400 END, false,
       CASE WHEN kind <> 'down' THEN md5(host) END, NULL, NULL, NULL, NULL
FROM g WHERE kind NOT IN ('noctl', 'offline');

DROP TABLE g;
"""

SCAN = """
SELECT (SELECT count(*) FROM measurements WHERE probe_cc IS NOT NULL),
       (SELECT count(DISTINCT measurement_id) FROM dns_answers WHERE answer IS NOT NULL),
       (SELECT count(*) FROM tcp_connects WHERE success),
       (SELECT count(*) FROM tls_handshakes WHERE success),
       (SELECT sum(length(body)) FROM http_transactions)
"""


def generate(db: Path, n: int, sql: str = GENERATE, *, analysis_tables: bool = False) -> float:
    """A fresh database at ``db`` filled by ``sql`` (formatted with ``n``); the seconds it took.

    Also bench/report_bench.py's generator (``analysis_tables``: the verdicts table too)."""
    import duckdb

    from probes.store import migrate

    if db.exists():
        db.unlink()
    # a plain connection: the probe's store caps DuckDB memory for small devices
    con = duckdb.connect(str(db))
    con.execute("SET memory_limit = '6GB'")
    migrate(con)
    if analysis_tables:
        from analysis.db import ensure_schema

        ensure_schema(con)
    started = time.perf_counter()
    con.execute(sql.format(n=n))
    con.execute("CHECKPOINT")
    con.close()
    return time.perf_counter() - started


def measure(db: Path, threads: int, memory_limit: str) -> dict:
    """Runs in a child process so the RSS is analysis's alone."""
    from analysis.db import connect
    from analysis.engine import analyze

    # the analysis's own connection, as `vantage analyze` opens it
    con = connect(db, memory_limit=memory_limit, threads=threads)
    con.execute("SET preserve_insertion_order = false")
    started = time.perf_counter()
    con.execute(SCAN).fetchall()
    scan = time.perf_counter() - started
    rss_scan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    count = analyze(con, public_networks=["198.18.0.0/15"],
                    fingerprints_dir=os.environ.get("VANTAGE_FINGERPRINTS_DIR", str(SHARED / "data" / "fingerprints")))
    seconds = time.perf_counter() - started
    statuses = dict(con.execute("SELECT coalesce(method, status), count(*) FROM verdicts GROUP BY ALL ORDER BY 1").fetchall())
    return {"analysed": count, "analyze_seconds": round(seconds, 2), "scan_seconds": round(scan, 2),
            "ratio_analyze_to_scan": round(seconds / scan, 1) if scan else None,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_scan_mb": round(rss_scan / 1024, 1), "verdicts": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", type=Path, default=Path("/tmp/vantage-analyze-bench.duckdb"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="1600MB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.db, args.threads, args.memory_limit)))
        return
    gen = generate(args.db, args.n)
    result = run_child(__file__, args, "--db", str(args.db))
    result.update({"measurements": args.n, "threads": args.threads, "memory_limit": args.memory_limit,
                   "generate_seconds": round(gen, 1), "db_mb": round(args.db.stat().st_size / 2**20, 1)})
    write_result("analyze", result)


def run_child(script: str, args: argparse.Namespace, *extra: str) -> dict:
    """``script --child`` in a fresh process (its RSS is the measured step's alone): its JSON line."""
    out = subprocess.run([sys.executable, script, "--child", *extra, "--threads", str(args.threads),
                          "--memory-limit", args.memory_limit], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_result(name: str, result: dict) -> None:
    """bench/results/<name>.json, and the same on stdout."""
    target = ROOT / "bench" / "results" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
