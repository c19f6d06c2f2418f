"""Load test of the control helper: does it shed load instead of falling over?

Starts a slow loopback site (each answer delayed ~300 ms) and a loopback DNS
server in this process, runs ``vantage helper serve`` as a subprocess limited to
50 requests in flight, fires N concurrent control requests at it, and records:
how many got 200 and how many 503, latencies, the helper's peak RSS (VmHWM from
/proc/<pid>/status, sampled while it runs), and whether it still answers a
normal request and /health afterwards.

    python bench/helper_load.py [--requests 300] [--max-inflight 50] [--delay 0.3]

Writes bench/results/helper_load.json. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench_servers import DNSProtocol, serve_page  # bench/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "helper_load.json"
PAGE = b"<!doctype html><html><head><title>slow</title></head><body>" + b"x" * 2000 + b"</body></html>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def one(session: aiohttp.ClientSession, helper: str, url: str) -> tuple[int, float, str | None]:
    started = time.monotonic()
    body = {"http_request": url, "http_request_headers": {}, "tcp_connect": []}
    try:
        async with session.post(helper, json=body) as resp:
            payload = await resp.json(content_type=None)
            failure = payload.get("http_request", {}).get("failure") if resp.status == 200 else None
            return resp.status, time.monotonic() - started, failure
    except Exception as exc:  # a crash or a refused connection shows up here
        return -1, time.monotonic() - started, type(exc).__name__


async def run(requests: int, max_inflight: int, delay: float) -> dict:
    hits = 0

    def hit() -> None:
        nonlocal hits
        hits += 1

    runner = await serve_page(PAGE, delay, backlog=2048, on_request=hit)
    site_port = runner.addresses[0][1]
    loop = asyncio.get_running_loop()
    dns_transport, _ = await loop.create_datagram_endpoint(DNSProtocol, local_addr=("127.0.0.1", 0))
    dns_port = dns_transport.get_extra_info("sockname")[1]

    helper_port = free_port()
    helper_url = f"http://127.0.0.1:{helper_port}/"
    command = [sys.executable, "-m", "cli.main", "helper", "serve", "--listen", f"127.0.0.1:{helper_port}",
               "--allow", "127.0.0.0/8", "--max-inflight", str(max_inflight), "--rate-per-minute", "0",
               "--resolver", f"127.0.0.1:{dns_port}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, vm_hwm_kib(proc.pid) or 0)
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    result: dict = {}
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            for _ in range(100):  # wait for the helper to listen
                try:
                    async with session.get(helper_url + "health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("helper did not start: " + proc.stderr.read().decode()[-2000:])
            rss_idle = vm_hwm_kib(proc.pid)
            url = f"http://slow.test:{site_port}/"
            started = time.monotonic()
            outcomes = await asyncio.gather(*(one(session, helper_url, url) for _ in range(requests)))
            wall = time.monotonic() - started
            statuses = [o[0] for o in outcomes]
            ok = [o for o in outcomes if o[0] == 200]
            shed = [o for o in outcomes if o[0] == 503]
            after_status, after_seconds, after_failure = await one(session, helper_url, url)
            async with session.get(helper_url + "health") as resp:
                health = await resp.json()
        alive = proc.poll() is None
        result = {
            "requests": requests,
            "max_inflight": max_inflight,
            "site_delay_s": delay,
            "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "ok_200": len(ok),
            "shed_503": len(shed),
            "other": requests - len(ok) - len(shed),
            "ok_with_fetch_failure": sum(1 for o in ok if o[2] is not None),
            "latency_200_s": {"median": round(statistics.median(o[1] for o in ok), 3) if ok else None,
                              "max": round(max(o[1] for o in ok), 3) if ok else None},
            "latency_503_s": {"median": round(statistics.median(o[1] for o in shed), 3) if shed else None,
                              "max": round(max(o[1] for o in shed), 3) if shed else None},
            "wall_s": round(wall, 3),
            "site_requests": hits,
            "helper_alive": alive,
            "after_load": {"status": after_status, "seconds": round(after_seconds, 3), "failure": after_failure,
                           "health": health},
            "helper_rss_idle_kib": rss_idle,
            "helper_peak_rss_kib": max(peak, vm_hwm_kib(proc.pid) or 0),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "cpus": os.cpu_count(),
        }
    finally:
        sampling = False
        await sampler
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        dns_transport.close()
        await runner.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-inflight", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(run(args.requests, args.max_inflight, args.delay))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    healthy = result["helper_alive"] and result["after_load"]["status"] == 200 and result["other"] == 0
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
