"""The collector's aiohttp apps and its life cycle.

The public app speaks bk-003:

- ``POST /report`` opens a report (3.1): ``{"backend_version", "report_id",
  "supported_formats"}``.
- ``POST /report/{report_id}`` appends one measurement (3.2):
  ``{"measurement_id"}`` once it is durable in the spool.
- ``POST /report/{report_id}/close`` (3.3): ``{"status": "success"}``.
- ``POST /measurement``: single call, ``{"format": "json", "content": {...}}``
  without a report (stored under a per-day, per-network report name):
  ``{"measurement_id", "report_id"}``.
- ``POST /report/{report_id}/x_batch`` (ours): JSON lines, one measurement
  (``content``) per line, at most ``max_batch``: ``{"measurement_ids": [...]}``
  in order, all durable.

Every failure is a JSON object ``{"error": reason}`` with a 4xx status (5xx
only for our own failures: the spool could not be written). The private app
(``--metrics-listen``) serves ``/healthz`` and ``/metrics``.

No client address is logged or kept: no access log; the rate limit keys a
keyed hash (services/limits.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from core.errors import VantageError
from core.net import parse_host_port
from probes import store
from probes.runner import scrub

from . import protocol
from .ingest import IngestProcess
from .limits import InFlight, Metrics, RateLimiter, client_address, read_body
from .protocol import Reject
from .spool import Report, Spool


class CollectorConfigError(VantageError):
    """A collector setting that cannot work (bad address, unusable folder): one line."""


@dataclass
class CollectorConfig:
    listen: str = "127.0.0.1:8470"
    db: str = "collector.duckdb"
    spool: str = "spool"
    metrics_listen: str = "127.0.0.1:8471"
    max_body: int = 8 << 20          # bytes per request, before and after gzip
    max_batch: int = 1000            # measurements per x_batch request
    rate_per_minute: int = 1200      # requests per client per minute (0: no limit)
    max_in_flight: int = 64
    trust_forwarded_for: bool = False
    segment_seconds: float = 1.0
    segment_bytes: int = 16 << 20
    # Ingestion reads and flattens in a reader process of its own while the ingestor writes (the bench's
    # VANTAGE_COLLECTOR_INGEST_READER=0 turns it off to compare).
    ingest_reader: bool = os.environ.get("VANTAGE_COLLECTOR_INGEST_READER", "1") != "0"


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


class Collector:
    def __init__(self, config: CollectorConfig, log=None):
        self.config = config
        self.log = log or (lambda message: print(f"vantage collector: {message}", file=sys.stderr, flush=True))
        self.spool = Spool(config.spool, config.segment_bytes, config.segment_seconds)
        self.ingestor = IngestProcess(config.db, config.spool, reader=config.ingest_reader)
        self.limiter = RateLimiter(config.rate_per_minute)
        self.in_flight = InFlight(config.max_in_flight)
        self.metrics = Metrics()
        self.started = time.time()
        self.accepting = True
        m = self.metrics
        m.help.update({
            "vantage_collector_requests_total": "HTTP requests by endpoint and status",
            "vantage_collector_measurements_acknowledged_total": "measurements made durable in the spool and answered 200",
            "vantage_collector_rejected_total": "requests refused, by reason class",
        })
        m.gauge("vantage_collector_ingested_total", "measurements committed to the database", lambda: self.ingestor.ingested)
        m.gauge("vantage_collector_ingest_duplicates_total", "measurements already stored (retries, re-sent)",
                lambda: self.ingestor.duplicates)
        m.gauge("vantage_collector_ingest_torn_lines_total", "unreadable spool lines skipped (a crash's torn tail)",
                lambda: self.ingestor.torn)
        m.gauge("vantage_collector_ingest_db_rejected_total", "measurements refused by the database, or lines that cannot be read (rejected.jsonl)",
                lambda: self.ingestor.rejected)
        m.gauge("vantage_collector_ingest_errors_total", "ingestion pauses (database busy or failing)",
                lambda: self.ingestor.errors)
        m.gauge("vantage_collector_spool_ready_segments", "segments waiting for ingestion",
                lambda: len(self.spool.ready_segments()))
        m.gauge("vantage_collector_spool_bytes", "bytes in the spool", self.spool.pending_bytes)
        m.gauge("vantage_collector_spool_fsyncs_total", "group commits (one fsync each)", lambda: self.spool.fsyncs)
        m.gauge("vantage_collector_spool_fsync_seconds_total", "time spent writing and fsyncing",
                lambda: self.spool.fsync_seconds)
        m.gauge("vantage_collector_reports_open", "open reports",
                lambda: sum(1 for r in self.spool.reports.values() if not r.closed))
        m.gauge("vantage_collector_in_flight", "requests being handled", lambda: self.in_flight.count)
        m.gauge("vantage_collector_rate_limited_clients", "clients with a rate-limit bucket", lambda: len(self.limiter))
        m.gauge("vantage_collector_ingestor_up", "1 while the ingestor process runs", lambda: int(self.ingestor.alive))
        m.gauge("vantage_collector_uptime_seconds", "seconds since start", lambda: time.time() - self.started)

    # --- apps ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body + 1, middlewares=[self._middleware])
        app.router.add_post("/report", self.handle_open)
        app.router.add_post("/report/{report_id}", self.handle_submit)
        app.router.add_post("/report/{report_id}/close", self.handle_close)
        app.router.add_post("/report/{report_id}/x_batch", self.handle_batch)
        app.router.add_post("/measurement", self.handle_single)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        endpoint = endpoint.replace("{report_id}", "id")
        try:
            if not self.accepting:
                raise Reject(503, "the collector is shutting down", {"Retry-After": "5"})
            allowed, wait = self.limiter.allow(client_address(request, self.config.trust_forwarded_for))
            if not allowed:
                self.metrics.inc("vantage_collector_rejected_total", (("reason", "rate_limited"),))
                raise Reject(429, "too many requests from this client", {"Retry-After": str(max(1, round(wait)))})
            if not self.in_flight.enter():
                self.metrics.inc("vantage_collector_rejected_total", (("reason", "busy"),))
                raise Reject(503, "the collector is busy", {"Retry-After": "1"})
            try:
                response = await handler(request)
            finally:
                self.in_flight.leave()
        except Reject as exc:
            response = _json(exc.status, {"error": exc.reason}, exc.headers)
            if exc.status not in (429, 503):
                self.metrics.inc("vantage_collector_rejected_total", (("reason", str(exc.status)),))
        except web.HTTPException as exc:  # 404, 405 from the router: JSON too (bk-003)
            response = _json(exc.status, {"error": exc.reason})
        except OSError as exc:  # the spool could not be written: nothing was acknowledged
            self.log(f"spool write failed: {exc.strerror or exc}")
            response = _json(503, {"error": "the measurement could not be stored; retry later"}, {"Retry-After": "30"})
        self.metrics.inc("vantage_collector_requests_total", (("endpoint", endpoint), ("status", str(response.status))))
        return response

    async def _body(self, request: web.Request) -> Any:
        raw = await read_body(request, self.config.max_body)
        return protocol.decode_body(raw, request.headers.get("Content-Encoding"), self.config.max_body)

    def _report(self, report_id: str) -> tuple[str, Report]:
        if len(report_id) > protocol.REPORT_ID_MAX:
            raise Reject(404, "no such report")
        key = protocol.report_key(report_id)
        report = self.spool.reports.get(key)
        if report is None:
            raise Reject(404, "no such report (unknown, or expired)")
        if report.closed:
            raise Reject(409, "the report is closed")
        return key, report

    # --- bk-003 --------------------------------------------------------------------

    async def handle_open(self, request: web.Request) -> web.Response:
        fields = protocol.check_open(await self._body(request))
        report_id = protocol.new_report_id(fields["probe_asn"])
        report = Report(protocol.public_report_id(report_id), fields["test_name"], time.time())
        await self.spool.open_report(protocol.report_key(report_id), report)
        return _json(200, {"backend_version": protocol.BACKEND_VERSION, "report_id": report_id,
                           "supported_formats": protocol.SUPPORTED_FORMATS})

    def _stored(self, content: Any, report_id: str | None, report: Report | None, peer: str | None) -> tuple[str, bytes]:
        content = protocol.check_content(content, report_id)
        if report is not None and content["test_name"] != report.test_name:
            raise Reject(400, f"test_name {content['test_name']!r} is not the report's ({report.test_name!r})")
        mid = protocol.measurement_id(content)
        if report is not None:
            public = report.public_id
        else:
            day = dt.datetime.now(dt.timezone.utc)
            public = f"{day:%Y%m%d}T000000Z_{content['probe_asn']}_single"
        stored = protocol.prepare(content, mid, public, peer, scrub)
        return mid, orjson.dumps({"m": mid, "r": stored}, option=orjson.OPT_APPEND_NEWLINE)

    @staticmethod
    def _envelope(doc: Any) -> Any:
        if not isinstance(doc, dict):
            raise Reject(400, "the body must be a JSON object {\"format\": \"json\", \"content\": {...}}")
        if doc.get("format", "json") != "json":
            raise Reject(400, "format must be \"json\" (YAML is not supported)")
        if "content" not in doc:
            raise Reject(400, "content is missing")
        return doc["content"]

    async def handle_submit(self, request: web.Request) -> web.Response:
        report_id = request.match_info["report_id"]
        _, report = self._report(report_id)
        content = self._envelope(await self._body(request))
        mid, line = self._stored(content, report_id, report, request.remote)
        await self.spool.append(line)
        self.metrics.inc("vantage_collector_measurements_acknowledged_total")
        return _json(200, {"measurement_id": mid})

    async def handle_single(self, request: web.Request) -> web.Response:
        content = self._envelope(await self._body(request))
        if isinstance(content, dict) and content.get("report_id"):
            content = dict(content, report_id=None)  # no report: nothing to check it against
        mid, line = self._stored(content, None, None, request.remote)
        await self.spool.append(line)
        self.metrics.inc("vantage_collector_measurements_acknowledged_total")
        return _json(200, {"measurement_id": mid, "report_id": orjson.loads(line)["r"]["report_id"]})

    async def handle_close(self, request: web.Request) -> web.Response:
        report_id = request.match_info["report_id"]
        key = protocol.report_key(report_id) if len(report_id) <= protocol.REPORT_ID_MAX else ""
        report = self.spool.reports.get(key)
        if report is None:
            raise Reject(404, "no such report (unknown, or expired)")
        if not report.closed:
            await self.spool.close_report(key)
        return _json(200, {"status": "success"})

    async def handle_batch(self, request: web.Request) -> web.Response:
        report_id = request.match_info["report_id"]
        _, report = self._report(report_id)
        raw = await read_body(request, self.config.max_body)
        data = protocol.decompress(raw, request.headers.get("Content-Encoding"), self.config.max_body)
        # Counted before parsing: a million tiny records cost one count, not a million dicts.
        if data.count(b"\n") + 1 > self.config.max_batch + 1:
            raise Reject(413, f"a batch holds at most {self.config.max_batch} measurements (JSON lines)")
        lines = [line for line in data.split(b"\n") if line.strip()]
        if not lines:
            raise Reject(400, "an empty batch")
        if len(lines) > self.config.max_batch:
            raise Reject(413, f"a batch holds at most {self.config.max_batch} measurements (JSON lines)")
        ids, out = [], []
        for number, line in enumerate(lines, 1):
            try:
                mid, stored = self._stored(protocol.parse_json(line), report_id, report, request.remote)
            except Reject as exc:
                raise Reject(exc.status, f"line {number}: {exc.reason}") from None
            ids.append(mid)
            out.append(stored)
        await self.spool.append(out, len(out))
        self.metrics.inc("vantage_collector_measurements_acknowledged_total", by=len(out))
        return _json(200, {"measurement_ids": ids})

    # --- private --------------------------------------------------------------------

    async def handle_health(self, request: web.Request) -> web.Response:
        ok = self.accepting
        return _json(200 if ok else 503, {
            "status": "ok" if ok else "stopping", "backend_version": protocol.BACKEND_VERSION,
            "spool_ready_segments": len(self.spool.ready_segments()), "ingested": self.ingestor.ingested,
            "ingestor_up": self.ingestor.alive,
            "ingest_error": self.ingestor.last_error})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> tuple[list[web.AppRunner], list[str]]:
        """Open the spool (recovering a crash's leftovers), start the
        ingestor, then listen. Returns the runners and the bound addresses
        (public first, then metrics)."""
        self.spool.open()
        self.spool.start()
        self.ingestor.start()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        runners, bound = [], []
        for app, listen in ((self.app(), self.config.listen), (self.metrics_app(), self.config.metrics_listen)):
            host, port = _endpoint(listen)
            # auto_decompress off: the body is inflated here, bounded (protocol.decompress), not by the parser.
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=10.0,
                                   auto_decompress=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                await runner.cleanup()
                for r in runners:
                    await r.cleanup()
                raise CollectorConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
            runners.append(runner)
            for sock in site._server.sockets:  # the port, when 0 was asked for
                name = sock.getsockname()
                bound.append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")
                break
        return runners, bound

    async def _supervise(self) -> None:
        """An ingestor that died (the OOM killer, a bug) is started again:
        the spool keeps everything meanwhile, and ingestion is idempotent."""
        while self.accepting:
            await asyncio.sleep(2.0)
            if self.accepting and not self.ingestor.alive:
                self.log("the ingestor stopped unexpectedly; starting it again")
                self.ingestor.start()  # the same IngestProcess: its counters carry on

    async def stop(self, runners: list[web.AppRunner]) -> None:
        """Stop accepting, finish the requests in flight, make the spool
        durable, ingest everything spooled, close the database."""
        self.accepting = False
        self._supervisor.cancel()
        await runners[0].cleanup()
        await self.spool.close()
        await asyncio.get_running_loop().run_in_executor(None, self.ingestor.stop)
        for runner in runners[1:]:
            await runner.cleanup()


def _endpoint(listen: str) -> tuple[str, int]:
    try:
        host, port = parse_host_port(listen, None)
    except ValueError as exc:
        raise CollectorConfigError(f"--listen {listen!r}: {exc}") from None
    if port is None:
        raise CollectorConfigError(f"{listen!r} needs a port (HOST:PORT)")
    return host, port


def check(config: CollectorConfig) -> None:
    for name in ("db", "spool"):
        path = Path(getattr(config, name))
        parent = path if name == "spool" else path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollectorConfigError(f"--{name} {path}: {exc.strerror}") from None
        if not os.access(parent, os.W_OK):
            raise CollectorConfigError(f"--{name} {path}: {parent} is not writable")
    _endpoint(config.listen)
    _endpoint(config.metrics_listen)
    try:  # create or migrate it now: a database of a newer Vantage is one line, not an ingestor failing forever
        store.connect(config.db).close()
    except store.StoreError as exc:
        if "schema version" in str(exc):
            raise CollectorConfigError(str(exc)) from None
        # Busy (an analyst has it open): serve anyway, the spool waits for it.


async def serve_forever(config: CollectorConfig, on_ready=None) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (``Collector.stop``)."""
    check(config)
    # aiohttp's own loggers name the peer ("Error handling request from ..."): silenced, addresses never logged.
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        logging.getLogger(name).propagate = False
    collector = Collector(config)
    # Before the ports are bound: a SIGTERM as soon as they answer is a clean stop, not the default death.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners, bound = await collector.start()
    collector.log(f"listening on {bound[0]} (metrics and health on {bound[1]}); spool {config.spool}, "
                  f"database {config.db}; {collector.spool.recovered} open segment(s) recovered, "
                  f"{len(collector.spool.ready_segments())} to ingest")
    if on_ready:
        on_ready(bound)
    await stop.wait()
    collector.log("stopping: no new requests; ingesting what is spooled")
    await collector.stop(runners)
    i = collector.ingestor
    collector.log(f"stopped: {i.ingested} measurements ingested ({i.duplicates} duplicates, {i.torn} torn lines, "
                  f"{i.rejected} refused by the database); {len(collector.spool.ready_segments())} segment(s) left")
