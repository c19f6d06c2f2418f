"""The async runner: concurrency, per-domain politeness, deadlines, resume.

``run_tests`` is a whole `vantage run` (tests, options, location, the event
loop, the rescue file); ``run_inputs`` is the worker pool it drives:

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
import contextlib
import ipaddress
import os
import re
import socket
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, ContextManager, Iterable

from core import paths

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
    # The measurement's own deadline from the context (traceroute: its runs and
    # pauses), instead of ctx.timeouts.measurement.
    deadline: Callable[[Any], float] | None = None


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
    insert_rows(con, "run_inputs", [{"run_id": run_id, "position": i, "input": url, "category_code": category}
                                    for i, (url, category) in enumerate(inputs)])
    con.execute("COMMIT")


def finish_run(con, run_id: str, status: str, sink: Sink | None = None) -> str:
    """Mark the run ended; with the run's (closed) ``sink``, the status says
    what happened to its data too (``Sink.run_status``: ``partial`` when some
    records went to the rescue file, ``store_failed`` when the database
    refused writes) and ``runs.rescued`` counts the rescued records.
    Returns the status written."""
    rescued = 0
    if sink is not None:
        status, rescued = sink.run_status(status), sink.rescued
    con.execute(
        "UPDATE runs SET status = ?, finished_at = ?, rescued = coalesce(rescued, 0) + ? WHERE run_id = ?",
        [status, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), rescued, run_id],
    )
    return status


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
    measurement_deadline = test.deadline(ctx) if test.deadline else ctx.timeouts.measurement

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


# --------------------------------------------------------------------------
# A whole `vantage run`: which tests, the run's options, resume, the location,
# the event loop, the rescue file. The command line parses options and prints;
# everything it runs is here.

TESTS = ("web", "throttling", "all", "dns-injection", "traceroute")
PACKET_TESTS = ("dns-injection", "traceroute")  # need raw sockets (probes/packets.py)


def experiments(test: str) -> list[Experiment]:
    """The tests `vantage run TEST` runs: web, throttling, or all (one run each)."""
    from . import throttling as th
    from . import web_connectivity as wc

    web = Experiment(wc.TEST_NAME, wc.TEST_VERSION, wc.measure, wc.new_test_keys, wc.outcome_label)
    thr = Experiment(th.TEST_NAME, th.TEST_VERSION, th.measure, th.new_test_keys, th.outcome_label)
    if test in PACKET_TESTS:
        from . import dns_injection as di
        from . import traceroute as tr

        module = di if test == "dns-injection" else tr
        return [Experiment(module.TEST_NAME, module.TEST_VERSION, module.measure, module.new_test_keys, module.outcome_label,
                           getattr(module, "deadline", None))]
    return {"web": [web], "throttling": [thr], "all": [web, thr]}[test]


# Run options that have a value even when neither the command line nor the
# resumed run gave one.
_OPTION_DEFAULTS: dict[str, Any] = {"no_doh": False, "public_networks": []}


def run_options(given: dict[str, Any], recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a run records (``runs.options``): each given value, else the
    one the resumed run recorded, else its default."""
    options = dict(recorded or {})
    for key, value in given.items():
        if key in _OPTION_DEFAULTS:
            options[key] = value or options.get(key) or _OPTION_DEFAULTS[key]
        else:
            options[key] = value or options.get(key)
    return options


@dataclass
class Resumed:
    """What an interrupted run still has to do."""

    run_id: str
    test: str  # the `vantage run` test name: a run is one test (`all` starts one per test)
    options: dict[str, Any]
    inputs: list[tuple[str, str | None]]  # the inputs without a stored measurement


def resume(con, run_id: str) -> Resumed | None:
    """The run ``run_id`` as recorded, or None when the database has no such run."""
    row = con.execute("SELECT test_name, options FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        return None
    by_name = {spec.name: test for test in ("web", "throttling", *PACKET_TESTS) for spec in experiments(test)}
    return Resumed(run_id, by_name.get(row[0], "web"), json.loads(row[1] or "{}"), remaining_inputs(con, run_id))


def rescue_path(db_file: str | os.PathLike, run_id: str) -> Path:
    """Where a run's records go when the database refuses writes: beside the
    database, ``<db file name>.rescue-<run id>.jsonl`` (core.paths.beside_db)."""
    return paths.beside_db(db_file, f".rescue-{run_id}.jsonl")


def limit_malloc_arenas() -> None:
    """glibc gives each resolver thread its own malloc arena, which it keeps;
    two arenas are plenty for a probe that spends its time waiting (-10 MB
    of RSS on a 10,000-URL run). No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def prepare_event_loop(concurrency: int) -> None:
    """Call inside the running loop before measuring: getaddrinfo runs in the
    default executor, whose default size (cores + 4) would cap system lookups
    far below the run's concurrency."""
    from concurrent.futures import ThreadPoolExecutor

    limit_malloc_arenas()
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=max(8, concurrency)))


def _setting(config, name: str, default: Any = None) -> Any:
    value = getattr(config, name)
    return default if value in (None, "", []) else value


async def locate(config, probe_cc: str | None = None, probe_asn: str | None = None) -> tuple[Location, str | None]:
    """Where the measurements are taken, and a warning when that is unknown.

    ``probe_cc``/``probe_asn`` override the geolocated values; with both, no
    lookup is made."""
    from . import geo

    location = Location(scrub_ips=local_addresses())
    warning = None
    if probe_cc and probe_asn:
        location.probe_cc, location.probe_asn = probe_cc.upper(), probe_asn.upper()
        if not location.probe_asn.startswith("AS"):
            location.probe_asn = "AS" + location.probe_asn
        return location, None
    found = await geo.discover_probe_location(config)
    location.probe_cc, location.probe_asn = found.cc, found.asn
    location.network_name = found.network_name
    if found.ip_for_scrubbing:
        location.scrub_ips.append(found.ip_for_scrubbing)
    warning = found.warning
    if probe_cc:
        location.probe_cc = probe_cc.upper()
    if probe_asn:
        location.probe_asn = probe_asn.upper() if probe_asn.upper().startswith("AS") else "AS" + probe_asn
    return location, warning


# progress(test name, inputs to measure) -> a context manager whose value is
# called with (url, outcome label) after each measurement.
Progress = Callable[[str, int], ContextManager[Callable[[str, str], None]]]


async def run_tests(
    con,
    db_file: str,
    tests: list[Experiment],
    inputs: list[tuple[str, str | None]],
    options: dict[str, Any],
    config,
    *,
    resume_id: str | None = None,
    concurrency: int | None = None,
    max_runtime: float | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    runs: dict[str, str] | None = None,
    hand_over: Callable[[dict], None] | None = None,
) -> list[RunSummary]:
    """Run each test over ``inputs`` (a new run per test), or finish the run
    ``resume_id`` (one test; ``inputs`` are its remaining inputs).

    Settings come from ``options`` (the run's, see ``run_options``), else from
    ``config``. Every finished measurement is stored; the run is marked
    finished, timed_out, store_failed or interrupted (Ctrl-C) at the end.

    ``con`` None (`vantage run`): a forked process measures, never opening
    the database; its measurements go to a spool (the run's start as its
    first line), and once it has exited this process records the runs and
    stores the spools (probes/spool.py, ``measure_apart``). ``runs`` is filled
    with each run id and its final status, also when the run is cut by Ctrl-C.
    ``hand_over``: the spools are stored elsewhere (``spool.store_elsewhere``)."""
    if con is None:
        from . import spool

        async def measure(progress, warn, runs):
            return await _measure_tests(None, db_file, tests, inputs, options, config, resume_id=resume_id,
                                        concurrency=concurrency, max_runtime=max_runtime, progress=progress,
                                        warn=warn, runs=runs)

        return await spool.measure_apart(measure, db_file, progress=progress, warn=warn, runs=runs, hand_over=hand_over)
    return await _measure_tests(con, db_file, tests, inputs, options, config, resume_id=resume_id,
                                concurrency=concurrency, max_runtime=max_runtime, progress=progress, warn=warn,
                                runs=runs)


async def _measure_tests(con, db_file: str, tests: list[Experiment], inputs: list[tuple[str, str | None]],
                         options: dict[str, Any], config, *, resume_id: str | None, concurrency: int | None,
                         max_runtime: float | None, progress: Progress | None, warn: Callable[[str], None] | None,
                         runs: dict[str, str] | None) -> list[RunSummary]:
    """``run_tests``'s measuring: with ``con`` None, each run's spool is ended
    (its end line) for the caller to store."""
    import aiohttp

    from . import spool, store
    from core.net import Policy

    from .timeouts import Timeouts

    concurrency = concurrency or int(_setting(config, "concurrency", 50))
    prepare_event_loop(concurrency)
    location, warning = await locate(config, options.get("probe_cc"), options.get("probe_asn"))
    if warning and warn:
        warn(warning)
    ctx = ProbeContext(
        timeouts=Timeouts(),
        resolver=options.get("resolver") or _setting(config, "resolver") or None,  # config default: /etc/resolv.conf
        doh_url=None if options.get("no_doh") else (options.get("doh_url") or _setting(config, "doh_url")),
        helpers=options.get("helpers") or list(_setting(config, "helpers", [])),
        extra_ca_file=options.get("ca_file") or _setting(config, "extra_ca_file"),
        allow=Policy.from_cidrs(options.get("public_networks") or []),  # where redirects may lead
    )
    ctx.packet = {k: options[k] for k in ("target", "control_domain", "capture", "pause") if options.get(k)}  # the packet probes'
    summaries = []
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx.tls())
    async with aiohttp.ClientSession(connector=connector) as session:
        ctx.session = session
        for test in tests:
            this_run = resume_id or new_id()
            if resume_id is None and con is not None:
                start_run(con, this_run, test, inputs, options, location)
            if runs is not None:
                runs[this_run] = "interrupted"
            if con is None:  # the run is recorded from the spool's first line when the spool is stored
                begun = None if resume_id else spool.start_entry(this_run, test.name, inputs, options, location)
                sink = spool.SpoolSink(spool.spool_path(db_file, this_run), rescue_path=rescue_path(db_file, this_run),
                                       start=begun)
            else:
                sink = store.Sink(con, rescue_path=rescue_path(db_file, this_run))
            status = "interrupted"
            try:
                with (progress or _no_progress)(test.name, len(inputs)) as on_result:
                    summary = await run_inputs(
                        inputs, test=test, ctx=ctx, sink=sink, run_id=this_run, location=location,
                        concurrency=concurrency, max_runtime=max_runtime, on_result=on_result,
                    )
                status = summary.status
                summaries.append(summary)
            finally:
                if con is None:  # measure_apart stores the spool once this process is gone
                    sink.end(status)
                else:
                    try:
                        sink.close()
                    finally:
                        try:
                            _ended(finish_run(con, this_run, status, sink=sink), this_run, summaries, runs)
                            con.execute("CHECKPOINT")
                        except Exception:  # the database already failed; sink.close said so
                            pass
    return summaries


def _ended(final: str, run_id: str, summaries: list[RunSummary], runs: dict[str, str] | None) -> None:
    if runs is not None:
        runs[run_id] = final
    if summaries and summaries[-1].run_id == run_id:
        summaries[-1].status = final


@contextlib.contextmanager
def _no_progress(name: str, total: int):
    yield None
