"""Probe throughput and memory: `vantage run` over N URLs against loopback
servers that wait 100 ms before each DNS and HTTP response.

Everything runs inside a fresh network namespace (root needed) whose
resolv.conf points at the benchmark's DNS server, so the system resolver,
the UDP resolver and HTTP are all exercised and no packet leaves loopback.

    sudo python bench/probe_bench.py --urls 1000 --urls 10000

Writes bench/results/probe.json; docs/benchmarks.md summarises it.
Targets: >= 50 URLs/s at the default concurrency on 2 cores (issue 2); peak
RSS of the measuring process < 100 MB for 1,000 URLs and < 120 MB for 10,000
(issue 13). `vantage run` keeps DuckDB in short-lived processes
(probes/spool.py): their peak is reported apart (db_process_peak_rss_mb), and
peak_total_rss_mb is what the probe and its children held at once (sampled
every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
EXTRA_ENV = [e for e in os.environ.get("BENCH_ENV", "").split() if e]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            todo += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def run_once(ns: str, count: int, concurrency: int | None, workdir: Path, extra: list[str] | None = None) -> dict:
    urls = workdir / f"urls-{count}.txt"
    urls.write_text("".join(f"http://site{i}.bench.test/page\n" for i in range(count)))
    db = workdir / f"bench-{count}{'-capture' if extra else ''}.duckdb"
    cmd = ["ip", "netns", "exec", ns, "/usr/bin/env", f"HOME={workdir}", *EXTRA_ENV, sys.executable, "-m", "cli.main", "run", "web",
           "--input-file", str(urls), "--db", str(db), "--yes", "--quiet", "--json", "--no-doh",
           "--resolver", "127.0.0.1", "--probe-cc", "ZZ", "--probe-asn", "AS0", *(extra or [])]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
    peak_kb = total_kb = total_pss_kb = 0
    while True:
        # wait4: the rusage of the probe and of every descendant it waited
        # for (the short-lived database processes): ru_maxrss is the largest.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        peak_kb = max(peak_kb, _status_kb(proc.pid, "VmHWM"))
        # What the probe and its children hold at once (sampled): RSS counts the
        # libraries both map (libc, libpython) twice, PSS shares them out.
        family = _family(proc.pid)
        total_kb = max(total_kb, sum(_status_kb(p, "VmRSS") for p in family))
        total_pss_kb = max(total_pss_kb, sum(_pss_kb(p) for p in family))
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.monotonic() - start
    family_peak_kb = usage.ru_maxrss  # kB on Linux
    # `ip netns exec` execs the command, so the pid sampled is the probe itself.
    if proc.returncode != 0:
        raise SystemExit(f"vantage run failed ({proc.returncode}): {err.strip()[-500:]}")
    summary = json.loads(out)[0]
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    fetched = con.execute("SELECT count(*) FROM http_transactions WHERE side='probe' AND status_code = 200").fetchone()[0]
    con.close()
    from probes.config import SETTINGS_BY_NAME

    return {
        "urls": count, "concurrency": concurrency or SETTINGS_BY_NAME["concurrency"].default, "seconds": round(seconds, 2),
        "urls_per_second": round(count / seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
        # The database processes of `vantage run` (probes/spool.py), when larger than the probe itself.
        "db_process_peak_rss_mb": round(family_peak_kb / 1024, 1) if family_peak_kb > peak_kb else None,
        "peak_total_rss_mb": round(total_kb / 1024, 1), "peak_total_pss_mb": round(total_pss_kb / 1024, 1),
        "stored": stored, "fetched_ok": fetched, "outcomes": summary["outcomes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, action="append", help="URL counts to run (repeatable)")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--out", default=str(HERE / "results" / "probe.json"))
    parser.add_argument("--capture", action="store_true",
                        help="also run each count with `--capture` (docs/packet-probes.md) and report the cost")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the probe benchmark needs root (it creates a network namespace)")
    counts = args.urls or [1000]
    ns = f"vbench-{uuid.uuid4().hex[:6]}"
    netns_etc = Path("/etc/netns") / ns
    workdir = Path(tempfile.mkdtemp(prefix="vantage-bench-"))
    servers = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        servers = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "bench_servers.py"), "--delay", str(args.delay)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if servers.stdout.readline().strip() != "ready":
            raise SystemExit(f"benchmark servers did not start: {servers.stderr.read()[-500:]}")
        results = []
        for n in counts:
            plain = run_once(ns, n, args.concurrency, workdir)
            results.append(plain)
            if args.capture:  # right after, so a busy machine's drift hits both alike
                with_capture = run_once(ns, n, args.concurrency, workdir, ["--capture"])
                plain["capture"] = {"urls_per_second": with_capture["urls_per_second"],
                                    "peak_rss_mb": with_capture["peak_rss_mb"],
                                    "throughput_cost": round(1 - with_capture["urls_per_second"] / plain["urls_per_second"], 3)}
    finally:
        if servers:
            servers.kill()
            servers.wait()
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"benchmark": "probe", "delay_seconds": args.delay, "cpus": os.cpu_count(), "runs": results,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
