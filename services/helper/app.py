"""The helper's web service: the aiohttp application around a Measurer
(admission, parsing, errors, /health), and serving it."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from core.net import endpoint
from probes.records import SOFTWARE_VERSION

from . import limits
from . import log as helper_log
from .config import HelperConfig, parse_listen
from .measure import Measurer
from .protocol import BadRequest, parse_request

log = logging.getLogger("vantage.helper")
# aiohttp's server logger names the client address on malformed requests;
# we promise never to log client addresses.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL + 1)


class Helper:
    """The aiohttp application around a Measurer: admission control, parsing,
    errors, health."""

    def __init__(self, config: HelperConfig):
        self.config = config
        self.measurer = Measurer(config)
        self.limiter = limits.RateLimiter(config.rate_per_minute)
        self.inflight = limits.InFlight(config.max_inflight)
        self.served = 0
        self.stats = helper_log.RequestStats()  # for the periodic summary (services/helper/log.py)

    @property
    def in_flight(self) -> int:
        return self.inflight.count

    @property
    def shed(self) -> int:
        return self.inflight.shed

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_request_body)
        app.router.add_post("/", self.handle_control)
        app.router.add_post("/api/v1/websites", self.handle_control)
        app.router.add_get("/health", self.handle_health)
        return app

    @staticmethod
    def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": reason}, status=status, headers=headers)

    async def handle_control(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        allowed, wait = self.limiter.allow(limits.client_address(request, self.config.trust_forwarded_for))
        if not allowed:
            self.stats.add(429, time.monotonic() - started)
            return self._error(429, "rate limit exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        if not self.inflight.enter():
            # Shedding immediately keeps latency bounded for the requests we
            # do accept; a probe retries later or asks its next helper.
            self.stats.add(503, time.monotonic() - started)
            return self._error(503, "overloaded", {"Retry-After": "5"})
        status = 200
        try:
            try:
                raw = await limits.read_body(request, self.config.max_request_body)
                try:
                    data = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    raise BadRequest("malformed JSON") from None
                except RecursionError:  # hostile nesting, within the size cap
                    raise BadRequest("JSON nested too deeply") from None
                req = parse_request(data, self.config)
            except BadRequest as exc:
                status = 400
                return self._error(400, str(exc))
            result = await self.measurer.measure(req)
            self.served += 1
            return web.json_response(result)
        finally:
            self.inflight.leave()
            duration = time.monotonic() - started
            self.stats.add(status, duration)
            if self.config.access_log:
                # No client address, no URL: the log says how the service is
                # doing, not who measured what. Queued, never written from the
                # loop (services/helper/log.py).
                log.info("control request status=%d duration=%.3fs in_flight=%d", status, duration, self.in_flight)

    def log_summary(self, interval: float) -> str | None:
        """Log (and return) the summary of the requests since the last one;
        nothing when there were none."""
        line = self.stats.summary(interval, self.in_flight, self.shed, helper_log.dropped())
        if line is not None:
            log.info("%s", line)
        return line

    async def summarize_every(self, interval: float = helper_log.SUMMARY_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            self.log_summary(interval)

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": SOFTWARE_VERSION, "in_flight": self.in_flight})


async def start(helper: Helper, listen: str) -> tuple[web.AppRunner, list[str]]:
    """Serve ``helper`` on ``listen`` ("HOST:PORT"; port 0 picks one). Returns
    the runner (for cleanup) and the bound "host:port" addresses."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(helper.app(), access_log=None)  # aiohttp's access log records client addresses
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner, [endpoint(str(a[0]), a[1]) for a in runner.addresses]


async def serve_forever(config: HelperConfig) -> None:
    helper = Helper(config)
    runner, bound = await start(helper, config.listen)
    log.info("vantage helper %s listening on %s (max_inflight=%d, rate_per_minute=%d, allow=%s, access_log=%s)",
             SOFTWARE_VERSION, ", ".join(bound), config.max_inflight, config.rate_per_minute, config.allow or "none",
             "on" if config.access_log else "off")
    summaries = asyncio.ensure_future(helper.summarize_every())
    try:
        await asyncio.Event().wait()
    finally:
        summaries.cancel()
        await runner.cleanup()
