"""Collector throughput: 50 concurrent uploaders against one collector.

Runs ``vantage collector serve`` as a subprocess (pinned to 2 cores with
``taskset`` when it exists) and 50 uploaders in this process, each opening a
report and sending batches (our ``x_batch`` endpoint, ``--batch`` measurements
per request; ``--batch 1`` uses bk-003's one-measurement submit) of distinct
Web Connectivity measurements in the OONI envelope (~3 KB of JSON each: DNS,
TCP, TLS, one HTTP hop with a 1 KB body, the control's answer) for
``--seconds``. Every measurement counted is acknowledged: fsync'd in the
spool. Then SIGTERM: the collector ingests what is spooled and exits; the
bench checks every acknowledged id is in the central database.

Records: acknowledged measurements per second (sustained, over the whole
window), ingestion throughput (measurements committed to DuckDB per second of
the run, SIGTERM drain included), request latency percentiles, and the
collector's peak RSS (VmHWM, /proc).

    python bench/collector_bench.py [--seconds 20] [--uploaders 50] [--batch 100] [--rate N] [--label NAME]

Also the CPU per acknowledged measurement of the server, the ingestor (the
writer), its reader process and the uploaders (this process), and
``--profile PATH`` runs the server under cProfile.

docs/benchmarks.md's figures: ``--label max_rate`` (defaults), ``--rate 2000
--label paced_2000`` and ``--rate 2500 --label paced_2500`` (is ingestion
keeping up with what is offered?) and
``--batch 1 --seconds 10 --label single_submit`` (bk-003's one-per-request).

Writes bench/results/collector.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import duckdb
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULTS = ROOT / "bench" / "results" / "collector.json"

import analysis_fixtures as F  # noqa: E402  (tests/: the records the analysis tests use)
from core.ooni_format import to_ooni  # noqa: E402

OPEN = {"data_format_version": "0.2.0", "format": "json", "probe_asn": "AS64500", "probe_cc": "ZZ",
        "software_name": "vantage", "software_version": "0.1.0", "test_name": "web_connectivity",
        "test_version": "0.1.0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def template() -> bytes:
    """One measurement as JSON with two placeholders (uploader, sequence)
    substituted per copy: every measurement is distinct, none costs the
    client a JSON encoding."""
    ip = "198.18.0.10"
    url = "https://site.example/UPLOADER/SEQUENCE"
    body = F.page("a page", 1000)
    record = F.web(url, queries=[F.q("site.example", ip)], tcps=[F.tcp(ip)], tlss=[F.tls(ip, "site.example")],
                   requests=[F.http(url, ip, body=body)], ctl=F.control(addrs=(ip,)), run_id="bench")
    content = to_ooni(record, [body])
    content.pop("run_id", None)
    content["report_id"] = None
    return json.dumps(content).encode()


async def uploader(url: str, index: int, batch: int, until: float, stats: dict, blob: bytes,
                   interval: float | None) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(url + "/report", data=json.dumps(OPEN)) as r:
            rid = (await r.json())["report_id"]
        # The body's parts around the sequence number, once: a measurement costs
        # the client one join (no JSON encoding, no repeated replace).
        parts = blob.replace(b"UPLOADER", str(index).encode()).split(b"SEQUENCE")
        sequence = 0
        next_at = time.monotonic() + (interval or 0) * random.random()
        while time.monotonic() < until:
            if interval:  # paced: the offered rate, not as fast as possible
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval
            lines = [(b"%d" % n).join(parts) for n in range(sequence, sequence + batch)]
            sequence += batch
            started = time.monotonic()
            if batch == 1:
                data = b'{"format": "json", "content": ' + lines[0] + b"}"
                path = f"/report/{rid}"
            else:
                data = b"\n".join(lines)
                path = f"/report/{rid}/x_batch"
            async with s.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
                answer = orjson.loads(await r.read())
                if r.status != 200:
                    stats["errors"][r.status] = stats["errors"].get(r.status, 0) + 1
                    await asyncio.sleep(0.1)
                    continue
            stats["latency"].append(time.monotonic() - started)
            ids = answer["measurement_ids"] if batch > 1 else [answer["measurement_id"]]
            stats["acked"].extend(ids)


async def ingested_total(url: str) -> int | None:
    """The collector's ``vantage_collector_ingested_total`` (its metrics endpoint)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(url + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vantage_collector_ingested_total"):
                        return int(float(line.split()[-1]))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        pass
    return None


def direct_children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def children(pid: int) -> list[int]:
    found = direct_children(pid)
    return found + [g for c in found for g in children(c)]


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system, /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--uploaders", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=0,
                        help="offered measurements per second in all (0: as fast as the collector answers)")
    parser.add_argument("--label", default="max_rate", help="the key of this run in the results file")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--profile", metavar="PATH",
                        help="profile the server process (cProfile, pstats file at PATH; slows it: figures not comparable)")
    args = parser.parse_args()

    load_at_start = round(os.getloadavg()[0], 2)  # a busy machine (other jobs) lowers every figure
    work = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    port, metrics_port = free_port(), free_port()
    entry = "from cli.main import main; main()"
    if args.profile:  # cProfile in the server process (its main thread: the event loop), dumped when it exits
        entry = ("import cProfile, sys\nfrom cli.main import main\nprofile = cProfile.Profile()\nprofile.enable()\n"
                 "try:\n    main()\nexcept SystemExit:\n    pass\nfinally:\n    profile.disable()\n"
                 f"    profile.dump_stats({str(Path(args.profile).resolve())!r})\n")
    command = [sys.executable, "-c", entry, "collector", "serve",
               "--listen", f"127.0.0.1:{port}", "--db", str(work / "central.duckdb"), "--spool", str(work / "spool"),
               "--metrics-listen", f"127.0.0.1:{metrics_port}", "--rate-per-minute", "0"]
    cores = "0-1"
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() >= 2:
        command = ["taskset", "-c", cores] + command
    log = open(work / "collector.log", "wb")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    peak = {}  # pid -> VmHWM (MB): the server and its children (the ingestor, multiprocessing's tracker)
    cpu = {}   # pid -> CPU seconds (user + system), the last reading

    def sample() -> None:  # VmHWM only grows: the last reading before exit is the peak
        while proc.poll() is None:
            for pid in [proc.pid] + children(proc.pid):
                peak[pid] = max(peak.get(pid, 0.0), peak_rss_mb(pid))
                cpu[pid] = max(cpu.get(pid, 0.0), cpu_seconds(pid))
            time.sleep(0.1)

    import threading

    threading.Thread(target=sample, daemon=True).start()
    blob = template()
    stats = {"acked": [], "latency": [], "errors": {}}
    started = time.monotonic()
    clients_cpu = resource.getrusage(resource.RUSAGE_SELF)
    until = started + args.seconds
    interval = args.batch * args.uploaders / args.rate if args.rate else None
    await asyncio.gather(*(uploader(url, i, args.batch, until, stats, blob, interval) for i in range(args.uploaders)))
    window = time.monotonic() - started
    now = resource.getrusage(resource.RUSAGE_SELF)  # the uploaders (and this sampler): the bench's own CPU
    clients_cpu = now.ru_utime + now.ru_stime - clients_cpu.ru_utime - clients_cpu.ru_stime
    server_cpu_at_stop = cpu_seconds(proc.pid)
    # The ingestor: the server's child holding the most memory (the other is multiprocessing's resource
    # tracker); its reader: the ingestor's child holding the most.
    ingestor_pid = max(direct_children(proc.pid), key=lambda pid: peak.get(pid, 0.0), default=None)
    reader_pid = max(direct_children(ingestor_pid), key=lambda pid: peak.get(pid, 0.0), default=None) \
        if ingestor_pid else None
    ingestor_cpu_at_stop = cpu_seconds(ingestor_pid) if ingestor_pid else 0.0
    reader_cpu_at_stop = cpu_seconds(reader_pid) if reader_pid else 0.0
    ingested_at_stop = await ingested_total(f"http://127.0.0.1:{metrics_port}")
    stop_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(600)
    drained = time.monotonic()
    collector_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)  # the server and everything it waited for
    collector_cpu = collector_cpu.ru_utime + collector_cpu.ru_stime
    con = duckdb.connect(str(work / "central.duckdb"), read_only=True)
    stored = {r[0] for r in con.execute("SELECT measurement_id FROM measurements").fetchall()}
    con.close()
    acked = set(stats["acked"])
    latency = sorted(stats["latency"])
    result = {
        "uploaders": args.uploaders,
        "batch": args.batch,
        "seconds": round(window, 1),
        "measurement_json_bytes": len(blob),
        "acknowledged": len(acked),
        "acknowledged_per_second": round(len(acked) / window),
        "ingested": len(stored),
        "ingested_per_second_incl_drain": round(len(stored) / (drained - started)),
        "drain_seconds_after_sigterm": round(drained - stop_at, 1),
        # written while the uploads ran (the ingestor sharing the cores with the server and the uploaders) ...
        "ingested_per_second_during_uploads": round(ingested_at_stop / window) if ingested_at_stop is not None else None,
        # ... and once they stopped, the backlog alone (SIGTERM: the collector ingests what is spooled, then exits)
        "ingested_per_second_drain": round((len(stored) - ingested_at_stop) / (drained - stop_at))
        if ingested_at_stop is not None and len(stored) - ingested_at_stop > 1000 else None,
        "missing_acknowledged": len(acked - stored),
        "request_latency_ms": {"p50": round(1000 * statistics.median(latency), 1),
                               "p99": round(1000 * latency[int(len(latency) * 0.99) - 1], 1)} if latency else None,
        "errors": stats["errors"],
        # CPU per acknowledged measurement while the uploads ran (the 2 cores' budget is 1,000 us per
        # measurement at 2,000/s), and the collector's in all (drain included)
        "cpu_us_per_measurement_during_uploads": {
            "server": round(1e6 * server_cpu_at_stop / max(1, len(acked))),
            "ingestor": round(1e6 * ingestor_cpu_at_stop / max(1, len(acked))),
            "ingest_reader": round(1e6 * reader_cpu_at_stop / max(1, len(acked))),
            "uploaders": round(1e6 * clients_cpu / max(1, len(acked)))},
        "collector_cpu_us_per_measurement_total": round(1e6 * collector_cpu / max(1, len(stored))),
        "offered_per_second": args.rate or None,
        "collector_peak_rss_mb": round(sum(peak.values()), 1),
        "server_peak_rss_mb": round(peak.get(proc.pid, 0.0), 1),
        "ingestor_peak_rss_mb": round(peak.get(ingestor_pid, 0.0), 1),
        "ingest_reader_peak_rss_mb": round(peak.get(reader_pid, 0.0), 1),
        "ingest_reader": os.environ.get("VANTAGE_COLLECTOR_INGEST_READER", "1") != "0",
        "collector_exit_code": code,
        "collector_cores": cores,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start,
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        runs = json.loads(out.read_text())
        runs = runs if isinstance(runs, dict) and "uploaders" not in runs else {}
    except (OSError, ValueError):
        runs = {}
    runs[args.label] = result  # one entry per kind of run: max_rate, paced_2000, single_submit
    out.write_text(json.dumps(runs, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
