"""A volunteer's real run: `vantage run web` with every URL controlled by OUR
helper (`vantage helper serve`), both against the bench's loopback servers
that wait 100 ms before every DNS and HTTP response (bench/bench_servers.py).

Everything runs inside a fresh network namespace (root needed): the bench's
DNS and web servers, the helper on 127.0.0.1:8081 (its own lookups through
the bench's resolver, its target allow-list 127.0.0.0/8), and the probe.

    sudo python bench/real_run_bench.py --urls 1000 --urls 10000

Reports URLs/s (goal >= 100, issue 13), how many measurements got the
helper's answer (``controlled``; the rest have a ``control_failure``), the
helper's peak RSS (VmHWM) and the probe's summed peak (the whole process
tree, sampled every 50 ms, as bench/probe_bench.py). Writes
bench/results/probe_real_run.json; docs/benchmarks.md summarises it.

The helper runs with ``--rate-per-minute 0``: its default (300 requests per
client address per minute) is meant for the public and would hold one probe
to 5 URLs/s; ``--helper-args`` passes other options (e.g. the default
``--max-inflight 50`` to see what shedding costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from probe_bench import _family, _load, _status_kb, finished, sh  # noqa: E402  (bench/ is this script's folder)

HELPER = "127.0.0.1:8081"


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (/proc/<pid>/stat), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _wait_helper(ns: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the helper exited: {log.read_text()[-800:]}")
        probe = sh("ip", "netns", "exec", ns, sys.executable, "-c",
                   f"import urllib.request; urllib.request.urlopen('http://{HELPER}/health', timeout=1)", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("the helper did not answer /health")


def _python(profile: str | None, name: str) -> list[str]:
    """The interpreter, under bench/profiled.py when profiling (``profile``: a directory)."""
    if not profile:
        return [sys.executable]
    return [sys.executable, str(HERE / "profiled.py"), str(Path(profile) / name)]


def run_once(ns: str, count: int, concurrency: int | None, workdir: Path, helper_pid: int,
             profile: str | None = None, servers_pid: int | None = None) -> dict:
    urls = workdir / f"urls-{count}.txt"
    urls.write_text("".join(f"http://site{i}.bench.test/page\n" for i in range(count)))
    db = workdir / f"real-{count}-{uuid.uuid4().hex[:6]}.duckdb"
    cmd = ["ip", "netns", "exec", ns, "/usr/bin/env", f"HOME={workdir}", *_python(profile, f"probe-{count}"), "-m", "cli.main", "run", "web",
           "--input-file", str(urls), "--db", str(db), "--yes", "--quiet", "--json", "--no-doh",
           "--resolver", "127.0.0.1", "--probe-cc", "ZZ", "--probe-asn", "AS0", "--helper", f"http://{HELPER}/"]
    if "--no-capture" in sh(sys.executable, "-m", "cli.main", "run", "--help", check=False).stdout:
        cmd.append("--no-capture")  # as a volunteer without root runs it, and as probe_bench.py measures
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    helper_before = _status_kb(helper_pid, "VmHWM")
    helper_cpu = _cpu_seconds(helper_pid)
    servers_cpu = _cpu_seconds(servers_pid) if servers_pid else 0.0
    load_before = _load()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
    total_kb = helper_rss_kb = 0
    child_cpu: dict[int, float] = {}  # the measuring process (a fork of `vantage run`): its last CPU seen
    child_seen: dict[int, tuple[float, float]] = {}  # and when it was first and last seen
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        family = _family(proc.pid)
        total_kb = max(total_kb, sum(_status_kb(p, "VmRSS") for p in family))
        for p in family:
            if p != proc.pid:
                child_cpu[p] = max(child_cpu.get(p, 0.0), _cpu_seconds(p))
                child_seen[p] = (child_seen.get(p, (time.monotonic(),))[0], time.monotonic())
        helper_rss_kb = max(helper_rss_kb, _status_kb(helper_pid, "VmRSS"))
        time.sleep(0.05)
    summary, seconds = finished(proc, start)
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    stored = con.execute("SELECT count(*) FROM measurements").fetchone()[0]
    controlled = con.execute("SELECT count(*) FROM measurements WHERE control_failure IS NULL").fetchone()[0]
    failures = dict(con.execute("SELECT control_failure, count(*) FROM measurements WHERE control_failure IS NOT NULL "
                                "GROUP BY 1 ORDER BY 2 DESC").fetchall())
    con.close()
    from probes.config import SETTINGS_BY_NAME

    # The measuring process: the child that used the most CPU (another is the prepare step).
    measuring = max(child_cpu, key=child_cpu.get, default=None)
    seen = child_seen.get(measuring, (start, start))

    return {
        "urls": count, "concurrency": concurrency or SETTINGS_BY_NAME["concurrency"].default,
        "seconds": round(seconds, 2), "urls_per_second": round(count / seconds, 1),
        # The measuring process's lifetime (to 50 ms): the rest of `seconds` is
        # `vantage run` preparing the database and storing the spool.
        "measuring_seconds": round(seen[1] - seen[0], 2),
        "before_measuring_seconds": round(seen[0] - start, 2),  # `python -m probes.spool prepare`, the fork
        "after_measuring_seconds": round(start + seconds - seen[1], 2),  # storing the spool into DuckDB
        "stored": stored, "controlled": controlled, "control_failures": failures, "outcomes": summary["outcomes"],
        "probe_peak_total_rss_mb": round(total_kb / 1024, 1),
        "probe_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "probe_cpu_ms_per_url": round((usage.ru_utime + usage.ru_stime) * 1000 / count, 1),
        # Of which the measuring process (sampled every 50 ms: its last ~50 ms are missed);
        # the rest is `vantage run` itself: start, and storing the spool into DuckDB.
        "probe_measuring_cpu_ms_per_url": round(child_cpu.get(measuring, 0.0) * 1000 / count, 1),
        "helper_peak_rss_mb": round(max(_status_kb(helper_pid, "VmHWM"), helper_rss_kb) / 1024, 1),
        "helper_peak_rss_before_mb": round(helper_before / 1024, 1),
        # The helper's CPU for this run, per URL: what one control costs it.
        "helper_cpu_seconds": round(_cpu_seconds(helper_pid) - helper_cpu, 2),
        "helper_cpu_ms_per_url": round((_cpu_seconds(helper_pid) - helper_cpu) * 1000 / count, 1),
        # The bench's DNS and web servers: two fetches and up to four lookups a URL.
        "servers_cpu_ms_per_url": (round((_cpu_seconds(servers_pid) - servers_cpu) * 1000 / count, 1)
                                   if servers_pid else None),
        "load_1min": [load_before, _load()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, action="append", help="URL counts to run (repeatable)")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--helper-args", default="--rate-per-minute 0",
                        help="options for `vantage helper serve` (default: %(default)s)")
    parser.add_argument("--out", default=str(HERE / "results" / "probe_real_run.json"))
    parser.add_argument("--aiohttp-servers", action="store_true",
                        help="serve the page with aiohttp (as probe_bench.py) rather than a bare asyncio protocol")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the helper and the probe under cProfile (bench/profiled.py), .prof files in DIR")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (it creates a network namespace)")
    counts = args.urls or [1000]
    ns = f"vreal-{uuid.uuid4().hex[:6]}"
    netns_etc = Path("/etc/netns") / ns
    workdir = Path(tempfile.mkdtemp(prefix="vantage-real-"))
    servers = helper = None
    results = []
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        servers = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(HERE / "bench_servers.py"), "--delay", str(args.delay),
             *([] if args.aiohttp_servers else ["--raw-http"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if servers.stdout.readline().strip() != "ready":
            raise SystemExit(f"benchmark servers did not start: {servers.stderr.read()[-500:]}")
        helper_log = (workdir / "helper.log").open("w")  # it logs every request: a pipe nobody reads would block it
        helper = subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/bin/env", f"HOME={workdir}", *_python(args.profile, "helper"), "-m", "cli.main", "helper",
             "serve", "--listen", HELPER, "--allow", "127.0.0.0/8", "--resolver", "127.0.0.1:53",
             *shlex.split(args.helper_args)],
            stdout=subprocess.DEVNULL, stderr=helper_log, cwd=HERE.parent)
        _wait_helper(ns, helper, workdir / "helper.log")
        for n in counts:
            results.append(run_once(ns, n, args.concurrency, workdir, helper.pid, args.profile, servers.pid))
            print(json.dumps(results[-1]), flush=True)
    finally:
        for proc in (helper, servers):
            if proc:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(netns_etc, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    report = {"benchmark": "probe_real_run", "delay_seconds": args.delay, "cpus": os.cpu_count(),
              "helper_args": args.helper_args, "web_server": "aiohttp" if args.aiohttp_servers else "raw asyncio",
              "runs": results, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
