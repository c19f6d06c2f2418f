"""Probe throughput and memory: `vantage run` over N URLs against loopback
servers that wait 100 ms before each DNS and HTTP response.

Everything runs inside a fresh network namespace (root needed) whose
resolv.conf points at the benchmark's DNS server, so the system resolver,
the UDP resolver and HTTP are all exercised and no packet leaves loopback.

    sudo python bench/probe_bench.py --urls 1000 --urls 10000

Writes bench/results/probe.json; docs/benchmarks.md summarises it.
Targets: >= 50 URLs/s at the default concurrency on 2 cores (issue 2); peak
RSS of the probe < 100 MB for 1,000 URLs and < 120 MB for 10,000 (issue 13):
peak_total_rss_mb, what the probe and its children held at once (sampled
every 50 ms). `vantage run` does its database work in images its own pid
exec's through (probes/spool.py, the hand-over): peak_rss_mb is the largest
VmHWM seen; a child that held more than the probe would show as
db_process_peak_rss_mb.
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


def finished(proc: subprocess.Popen, start: float) -> tuple[dict, float]:
    """The JSON summary of a `vantage run --json` that has exited, and its
    wall time since ``start``; a failed run ends the benchmark with its error."""
    out, err = proc.communicate()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"vantage run failed ({proc.returncode}): {err.strip()[-500:]}")
    return json.loads(out)[0], seconds


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
    summary, seconds = finished(proc, start)
    family_peak_kb = usage.ru_maxrss  # kB on Linux
    # `ip netns exec` execs the command, so the pid sampled is the probe itself.
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
        # CPU of the probe and the children it waited for: steadier than URLs/s on a shared machine.
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
    }


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _packets_stored(db: Path) -> int:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM packets").fetchone()[0]
    finally:
        con.close()


def capture_pairs(ns: str, count: int, concurrency: int | None, workdir: Path, pairs: int) -> dict:
    """The capture's cost (docs/packet-probes.md): ``pairs`` interleaved runs
    with `--no-capture` and `--capture`, the order alternating (ABBA) so a
    machine's drift hits both alike; the median, min and max of the pairs'
    costs, with the 1-minute load average around each pair."""
    import statistics

    rows = []
    for i in range(pairs):
        load_before = _load()
        order = ["--no-capture", "--capture"] if i % 2 == 0 else ["--capture", "--no-capture"]
        got = {}
        for flag in order:
            got[flag] = run_once(ns, count, concurrency, workdir, [flag])
            got[flag]["packets_stored"] = _packets_stored(workdir / f"bench-{count}-capture.duckdb")
            for old in workdir.glob(f"bench-{count}-capture.duckdb*"):  # each run starts from an empty database
                old.unlink()
        plain, captured = got["--no-capture"], got["--capture"]
        rows.append({"pair": i + 1, "first": order[0], "load_1min": [load_before, _load()],
                     "plain_urls_per_second": plain["urls_per_second"], "capture_urls_per_second": captured["urls_per_second"],
                     "throughput_cost": round(1 - captured["urls_per_second"] / plain["urls_per_second"], 3),
                     "plain_cpu_seconds": plain["cpu_seconds"], "capture_cpu_seconds": captured["cpu_seconds"],
                     "cpu_cost": round(captured["cpu_seconds"] / plain["cpu_seconds"] - 1, 3),
                     "plain_peak_rss_mb": plain["peak_rss_mb"], "capture_peak_rss_mb": captured["peak_rss_mb"],
                     "packets_stored": captured.get("packets_stored")})
    costs = [r["throughput_cost"] for r in rows]
    cpu = [r["cpu_cost"] for r in rows]
    loads = [x for r in rows for x in r["load_1min"]]
    return {"urls": count, "concurrency": concurrency, "pairs": rows,
            "throughput_cost": {"median": round(statistics.median(costs), 3), "min": min(costs), "max": max(costs)},
            "cpu_cost": {"median": round(statistics.median(cpu), 3), "min": min(cpu), "max": max(cpu)},
            "load_1min": {"min": min(loads), "max": max(loads)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, action="append", help="URL counts to run (repeatable)")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="default bench/results/probe.json (probe_capture.json with --capture)")
    parser.add_argument("--capture", action="store_true",
                        help="the capture's cost instead: --pairs interleaved runs of each count with --no-capture and "
                             "--capture (docs/packet-probes.md); writes bench/results/probe_capture.json unless --out")
    parser.add_argument("--pairs", type=int, default=5, help="with --capture: pairs of runs (default 5)")
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
            if args.capture:
                results.append(capture_pairs(ns, n, args.concurrency, workdir, args.pairs))
                continue
            results.append(run_once(ns, n, args.concurrency, workdir))
    finally:
        if servers:
            servers.kill()
            servers.wait()
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"benchmark": "probe", "delay_seconds": args.delay, "cpus": os.cpu_count(), "runs": results,
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out or HERE / "results" / ("probe_capture.json" if args.capture else "probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
