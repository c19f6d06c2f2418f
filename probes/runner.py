"""The async runner: concurrency, per-domain politeness, deadlines, resume.

- A fixed pool of workers (``concurrency``) pulls inputs from a queue, so a
  10,000-URL list costs a queue of strings, not 10,000 pending tasks.
- One measurement at a time per domain: the probe never hammers a site, and
  measurements of one domain do not disturb each other.
- Each measurement has a total deadline; a measurement cut short is stored with
  every step that finished and ``x_deadline_exceeded``.
- Finished records go to the Sink at once; Ctrl-C (cancellation) stores all of
  them and marks the run ``interrupted`` so ``--resume`` can finish it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import re
import socket
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from .context import ProbeContext
from .records import SOFTWARE_VERSION, Clock, Measurement, new_id
from .store import Sink, insert_rows

# A test: (name, version, measure(url, ctx, keys, clock), new_keys(), label(keys)).


@dataclass(frozen=True)
class Experiment:
    name: str
    version: str
    measure: Callable[..., Awaitable[Any]]
    new_keys: Callable[[], dict[str, Any]]
    label: Callable[[dict[str, Any]], str]


@dataclass
class Location:
    probe_cc: str = "ZZ"
    probe_asn: str = "AS0"
    network_name: str | None = None
    resolver_asn: str = "AS0"
    scrub_ips: list[str] = field(default_factory=list)  # never stored; scrubbed from records


@dataclass
class RunSummary:
    run_id: str
    status: str
    measured: int = 0
    total: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0
    network_down: int = 0


def _ip_pattern(ip: str) -> re.Pattern:
    # Whole addresses only: scrubbing 1.2.3.4 must not touch 11.2.3.45.
    edge = r"[0-9A-Fa-f:.]" if ":" in ip else r"[0-9.]"
    return re.compile(rf"(?<!{edge}){re.escape(ip)}(?!{edge})")


def scrub(record: dict[str, Any], ips: Iterable[str] | str | None) -> dict[str, Any]:
    """Remove the probe's own addresses from every string of the record
    (bodies, headers, error messages), including binary bodies kept as
    base64: OONI's practice, and our privacy promise."""
    if isinstance(ips, str):
        ips = [ips]
    patterns = [_ip_pattern(ip) for ip in (ips or []) if ip]
    if not patterns:
        return record
    keys = record.get("test_keys") or {}
    for r in keys.get("requests") or []:
        body = (r.get("response") or {}).get("body")
        if isinstance(body, dict) and body.get("format") == "base64":
            raw = base64.b64decode(body.get("data") or "")
            text = raw.decode("latin-1")  # byte-preserving: addresses are ASCII
            for pattern in patterns:
                text = pattern.sub("[scrubbed]", text)
            body["data"] = base64.b64encode(text.encode("latin-1")).decode()
    text = json.dumps(record, ensure_ascii=False)
    cleaned = text
    for pattern in patterns:
        cleaned = pattern.sub("[scrubbed]", cleaned)
    return record if cleaned == text else json.loads(cleaned)


def local_addresses() -> list[str]:
    """The addresses this machine would send from (no packet is sent: a UDP
    connect only picks a route). Scrubbed too, since behind no NAT they are
    the public address, and a public-IP lookup may be off or fail."""
    found = []
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((target, 9))
                address = sock.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            found.append(address)
    return found


async def _guarded(awaitable, keys: dict[str, Any], budget: float):
    """Await a test step within ``budget`` seconds; a deadline or a bug is
    recorded in the keys instead of losing the measurement."""
    try:
        return await asyncio.wait_for(awaitable, budget)
    except asyncio.TimeoutError:
        keys["x_deadline_exceeded"] = True
    except Exception as exc:
        from .failures import classify

        keys["x_test_error"] = classify(exc)
    return None


def domain_of(url: str) -> str:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or url).lower()


def start_run(con, run_id: str, test: Experiment, inputs: list[tuple[str, str | None]], options: dict, location: Location) -> None:
    con.execute("BEGIN")
    con.execute(
        "INSERT INTO runs (run_id, test_name, started_at, status, inputs_total, options, probe_cc, probe_asn, software_version) "
        "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
        [run_id, test.name, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), len(inputs), json.dumps(options),
         location.probe_cc, location.probe_asn, SOFTWARE_VERSION],
    )
    # Store the planned inputs so an interrupted run can be resumed.
    insert_rows(con, "run_inputs", [(run_id, i, url, category) for i, (url, category) in enumerate(inputs)])
    con.execute("COMMIT")


def finish_run(con, run_id: str, status: str) -> None:
    con.execute(
        "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
        [status, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), run_id],
    )


def remaining_inputs(con, run_id: str) -> list[tuple[str, str | None]]:
    """Inputs of ``run_id`` that have no stored measurement yet."""
    rows = con.execute(
        """SELECT i.input, i.category_code FROM run_inputs i
           WHERE i.run_id = ? AND NOT EXISTS (
               SELECT 1 FROM measurements m WHERE m.run_id = i.run_id AND m.input = i.input)
           ORDER BY i.position""",
        [run_id],
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


async def run_inputs(
    inputs: Iterable[tuple[str, str | None]],
    *,
    test: Experiment,
    ctx: ProbeContext,
    sink: Sink,
    run_id: str,
    location: Location,
    concurrency: int = 50,
    max_runtime: float | None = None,
    on_result: Callable[[str, str], None] | None = None,
) -> RunSummary:
    """Measure every input; returns when all are stored (or the run is cut)."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in inputs:
        queue.put_nowait(item)
    summary = RunSummary(run_id=run_id, status="finished", total=queue.qsize())
    # Per-domain politeness without idling workers: an input whose domain is
    # being measured waits in that domain's backlog, and the worker measuring
    # the domain takes it next.
    backlog: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    busy: set[str] = set()
    started = time.monotonic()
    deadline = started + max_runtime if max_runtime else None
    measurement_deadline = ctx.timeouts.measurement

    # Measurements whose slow tail (late DNS answers, the control) is still
    # running; bounded so memory stays flat.
    finishing: set[asyncio.Task] = set()
    tail_slots = asyncio.Semaphore(4 * max(1, concurrency))

    async def measure_one(url: str, category: str | None) -> None:
        m = Measurement(
            test_name=test.name, test_version=test.version, input=url, run_id=run_id,
            probe_cc=location.probe_cc, probe_asn=location.probe_asn, probe_network_name=location.network_name,
            resolver_asn=location.resolver_asn, measurement_id=new_id(),
        )
        if category:
            m.annotations["category_code"] = category
        keys = test.new_keys()
        m.test_keys = keys
        await tail_slots.acquire()
        t0 = time.monotonic()
        tail = await _guarded(test.measure(url, ctx, keys, Clock()), keys, measurement_deadline)
        if asyncio.iscoroutine(tail):
            task = asyncio.create_task(finish(m, category, keys, tail, t0))
            finishing.add(task)
            task.add_done_callback(finishing.discard)
        else:
            await finish_now(m, category, keys, t0)

    async def finish(m: Measurement, category, keys, tail, t0: float) -> None:
        await _guarded(tail, keys, max(0.0, measurement_deadline - (time.monotonic() - t0)))
        await finish_now(m, category, keys, t0)

    async def finish_now(m: Measurement, category, keys, t0: float) -> None:
        tail_slots.release()
        m.runtime = time.monotonic() - t0
        await sink.aput(scrub(m.to_dict(), location.scrub_ips), category)
        label = test.label(keys)
        summary.outcomes[label] += 1
        summary.measured += 1
        if keys.get("x_probe_network_ok") is False:
            summary.network_down += 1
        if on_result:
            on_result(m.input, label)

    def out_of_time() -> bool:
        if sink.failed:  # the database refuses writes: stop, keep what is measured
            summary.status = "store_failed"
            return True
        if deadline and time.monotonic() > deadline:
            summary.status = "timed_out"
            return True
        return False

    async def worker() -> None:
        while not out_of_time():
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            domain = domain_of(item[0])
            if domain in busy:
                backlog[domain].append(item)
                continue
            busy.add(domain)
            try:
                while item is not None and not out_of_time():
                    await measure_one(*item)
                    item = backlog[domain].popleft() if backlog[domain] else None
            finally:
                busy.discard(domain)
                backlog.pop(domain, None)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*workers)
        while finishing:
            await asyncio.gather(*list(finishing))
    except asyncio.CancelledError:
        summary.status = "interrupted"
        pending = workers + list(finishing)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise
    finally:
        summary.seconds = time.monotonic() - started
    return summary
