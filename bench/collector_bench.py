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

    python bench/collector_bench.py [--seconds 20] [--uploaders 50] [--batch 100]

Writes bench/results/collector.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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


async def uploader(url: str, index: int, batch: int, until: float, stats: dict, blob: bytes) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(url + "/report", data=json.dumps(OPEN)) as r:
            rid = (await r.json())["report_id"]
        mine = blob.replace(b"UPLOADER", str(index).encode())
        sequence = 0
        while time.monotonic() < until:
            lines = []
            for _ in range(batch):
                lines.append(mine.replace(b"SEQUENCE", str(sequence).encode()))
                sequence += 1
            started = time.monotonic()
            if batch == 1:
                data = b'{"format": "json", "content": ' + lines[0] + b"}"
                path = f"/report/{rid}"
            else:
                data = b"\n".join(lines)
                path = f"/report/{rid}/x_batch"
            async with s.post(url + path, data=data, headers={"Content-Type": "application/json"}) as r:
                answer = await r.json()
                if r.status != 200:
                    stats["errors"][r.status] = stats["errors"].get(r.status, 0) + 1
                    await asyncio.sleep(0.1)
                    continue
            stats["latency"].append(time.monotonic() - started)
            ids = answer["measurement_ids"] if batch > 1 else [answer["measurement_id"]]
            stats["acked"].extend(ids)


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
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-c", "from cli.main import main; main()", "collector", "serve",
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
    peak = [0.0]

    def sample() -> None:  # VmHWM only grows: the last reading before exit is the peak
        while proc.poll() is None:
            peak[0] = max(peak[0], peak_rss_mb(proc.pid))
            time.sleep(0.1)

    import threading

    threading.Thread(target=sample, daemon=True).start()
    blob = template()
    stats = {"acked": [], "latency": [], "errors": {}}
    started = time.monotonic()
    until = started + args.seconds
    await asyncio.gather(*(uploader(url, i, args.batch, until, stats, blob) for i in range(args.uploaders)))
    window = time.monotonic() - started
    stop_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(600)
    drained = time.monotonic()
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
        "missing_acknowledged": len(acked - stored),
        "request_latency_ms": {"p50": round(1000 * statistics.median(latency), 1),
                               "p99": round(1000 * latency[int(len(latency) * 0.99) - 1], 1)} if latency else None,
        "errors": stats["errors"],
        "collector_peak_rss_mb": round(peak[0], 1),
        "collector_exit_code": code,
        "collector_cores": cores,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
