"""`vantage upload`: our measurements to a collector (OONI's bk-003 protocol).

Every measurement this database holds that the collector has not yet
acknowledged is sent in OONI's envelope (``core.ooni_format.to_ooni``, the
same as `vantage export ooni`: OONI's field names plus our ``x_`` keys,
response bodies put back, ``probe_ip`` 127.0.0.1). Measurements imported from
OONI (``software_name`` other than ours) are OONI's already and are not sent.

- One report per (run, test): open (``POST /report``), submit each
  measurement (``POST /report/{id}``), close. A report the collector no longer
  knows (404) or closed (409) is opened again and the measurement re-sent.
- An acknowledgement (200 with the collector's ``measurement_id``) is
  recorded at once in the ``uploads`` table; what has no row there for this
  collector is pending. Collectors that derive the id from the content (ours
  does) store a re-sent measurement once, so an answer lost on the way back
  costs a resend, never a duplicate.
- Network errors and 429/5xx answers are retried a few times with
  exponential backoff and full jitter (``Retry-After`` respected); when the
  collector stays unreachable the upload stops and everything not
  acknowledged stays pending for the next `vantage upload` (bk-003 4.0: a few
  immediate retries, then later). Nothing is lost and nothing spins.
- A measurement the collector refuses (other 4xx) stays pending and is
  counted with the reason.
- ``socks5``: all traffic through a SOCKS5 proxy with the proxy resolving
  names (socks5h; Tor's SocksPort), as bk-003 recommends.
- Defence in depth: the machine's own addresses are scrubbed again from what
  is sent (the runner scrubbed them when measuring).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp

from core.errors import VantageError
from core.net import USER_AGENT, parse_host_port
from core.ooni_format import to_ooni

from .records import SOFTWARE_NAME
from .runner import local_addresses, scrub

ERRORS_LISTED = 20
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
GONE_STATUS = frozenset({404, 409})  # the report is unknown (expired, another collector) or closed


class UploadError(VantageError):
    """An upload that cannot start (no collector configured, a bad URL or proxy): one line."""


class _Unreachable(Exception):
    """The collector did not answer usefully after every retry."""


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (0-based) waits a
    uniform time in [0, min(cap, base * 2**n)]."""

    attempts: int = 4     # tries per request (the first and three retries)
    base: float = 0.5
    cap: float = 30.0
    sleep: Callable[[float], Any] = asyncio.sleep
    rng: random.Random = field(default_factory=random.SystemRandom)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        wait = self.rng.uniform(0, min(self.cap, self.base * (2 ** attempt)))
        if retry_after is not None:
            wait = max(wait, min(self.cap, retry_after))
        return wait


@dataclass
class UploadSummary:
    collector: str
    pending_before: int = 0
    uploaded: int = 0        # acknowledged this time
    refused: int = 0         # refused by the collector (4xx): still pending
    pending: int = 0         # not acknowledged after this upload
    reports: int = 0         # reports opened
    offline: bool = False    # the collector could not be reached: stopped early
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < ERRORS_LISTED:
            self.errors.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"collector": self.collector, "pending_before": self.pending_before, "uploaded": self.uploaded,
                "refused": self.refused, "pending": self.pending, "reports": self.reports, "offline": self.offline,
                "errors": list(self.errors)}


def check_collector(url: str | None) -> str:
    if not url:
        raise UploadError("no collector: pass --collector URL or set collector_url (vantage config)")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UploadError(f"the collector {url!r} is not an http(s) URL")
    return url.strip().rstrip("/")


_PENDING = ("FROM measurements m WHERE coalesce(m.software_name, ?) = ? AND NOT EXISTS "
            "(SELECT 1 FROM uploads u WHERE u.measurement_id = m.measurement_id AND u.collector = ?)")


def pending_count(con, collector: str) -> int:
    return con.execute(f"SELECT count(*) {_PENDING}", [SOFTWARE_NAME, SOFTWARE_NAME, collector]).fetchone()[0]


def _pending_groups(con, collector: str) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = {}
    rows = con.execute(f"SELECT m.measurement_id, coalesce(m.run_id, ''), coalesce(m.test_name, '') {_PENDING} "
                       "ORDER BY 2, 3, 1", [SOFTWARE_NAME, SOFTWARE_NAME, collector]).fetchall()
    for mid, run, test in rows:
        groups.setdefault((run, test), []).append(mid)
    return groups


def envelopes(con, ids: list[str], scrub_ips: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(measurement id, OONI measurement) for ``ids``, bodies put back."""
    rows = con.execute("SELECT measurement_id, record, category_code FROM measurements WHERE measurement_id IN "
                       "(SELECT unnest(?::VARCHAR[])) ORDER BY measurement_id", [ids]).fetchall()
    bodies: dict[str, list[str | None]] = {}
    for mid, body in con.execute("SELECT measurement_id, body FROM http_transactions WHERE side = 'probe' AND "
                                 "measurement_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY measurement_id, rowid",
                                 [ids]).fetchall():
        bodies.setdefault(mid, []).append(body)
    out = []
    for mid, text, category in rows:
        record = json.loads(text) if text else {"measurement_id": mid}
        record["measurement_id"] = mid
        content = to_ooni(record, bodies.get(mid, []), None, category)
        content.pop("run_id", None)
        content.pop("schema_version", None)
        if scrub_ips:
            content = scrub(content, scrub_ips)
        out.append((mid, content))
    return out


class _Client:
    def __init__(self, session: aiohttp.ClientSession, collector: str, backoff: Backoff):
        self.session = session
        self.collector = collector
        self.backoff = backoff
        self.gave_up: str | None = None  # once unreachable, every request stops at once (no retry storm)

    async def post(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """The JSON answer of a 200; _Refused for a 4xx that retrying will
        not change; _Unreachable when every attempt failed."""
        if self.gave_up:
            raise _Unreachable(self.gave_up)
        data = json.dumps(body, ensure_ascii=False).encode() if body is not None else b""
        last = "no attempt"
        for attempt in range(self.backoff.attempts):
            if self.gave_up:
                raise _Unreachable(self.gave_up)
            retry_after = None
            try:
                async with self.session.post(self.collector + path, data=data,
                                             headers={"Content-Type": "application/json"}) as response:
                    text = await response.read()
                    if response.status == 200:
                        try:
                            answer = json.loads(text)
                        except ValueError:
                            answer = None
                        if isinstance(answer, dict):
                            return answer
                        last = "200 without a JSON object"
                    elif response.status in RETRY_STATUS:
                        last = f"HTTP {response.status}"
                        retry_after = _seconds(response.headers.get("Retry-After"))
                    else:
                        raise _Refused(response.status, _reason(response.status, text))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {str(exc)[:120]}" if str(exc) else type(exc).__name__
            if attempt + 1 < self.backoff.attempts:
                await self.backoff.sleep(self.backoff.delay(attempt, retry_after))
        self.gave_up = last
        raise _Unreachable(last)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _reason(status: int, text: bytes) -> str:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    return f"HTTP {status}: {str(error)[:200]}" if error else f"HTTP {status}"


def _connector(socks5: str | None):
    if not socks5:
        return None
    try:
        host, port = parse_host_port(socks5, 1080)
    except ValueError as exc:
        raise UploadError(f"--socks5 {socks5!r}: {exc}") from None
    from aiohttp_socks import ProxyConnector, ProxyType

    # rdns: the proxy resolves the collector's name (socks5h), so no DNS query leaves this machine.
    return ProxyConnector(proxy_type=ProxyType.SOCKS5, host=host, port=port, rdns=True)


def _open_body(content: dict[str, Any]) -> dict[str, Any]:
    return {"data_format_version": "0.2.0", "format": "json", "probe_asn": content.get("probe_asn") or "AS0",
            "probe_cc": content.get("probe_cc") or "ZZ", "software_name": content.get("software_name") or SOFTWARE_NAME,
            "software_version": content.get("software_version") or "0", "test_name": content.get("test_name"),
            "test_version": content.get("test_version") or "0.0.0"}


async def upload(con, collector: str, *, socks5: str | None = None, backoff: Backoff | None = None,
                 concurrency: int = 4, chunk: int = 200, timeout: float = 60.0,
                 on_progress: Callable[[int, int], None] | None = None) -> UploadSummary:
    """Send every pending measurement of ``con`` to ``collector``; record each
    acknowledgement. Returns what happened (never raises for network
    trouble: that is ``offline``)."""
    collector = check_collector(collector)
    backoff = backoff or Backoff()
    summary = UploadSummary(collector)
    groups = _pending_groups(con, collector)
    summary.pending_before = sum(len(ids) for ids in groups.values())
    scrub_ips = local_addresses()
    done = 0
    session = aiohttp.ClientSession(connector=_connector(socks5), headers={"User-Agent": USER_AGENT},
                                    timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 20.0)))
    client = _Client(session, collector, backoff)
    try:
        for (run, test), ids in groups.items():
            report: dict[str, Any] = {"id": None}
            lock = asyncio.Lock()

            async def report_id(content: dict[str, Any], stale: str | None = None) -> str:
                async with lock:  # one open per report, whatever the concurrency
                    if report["id"] is None or report["id"] == stale:
                        answer = await client.post("/report", _open_body(content))
                        if not isinstance(answer.get("report_id"), str) or "json" not in answer.get(
                                "supported_formats", ["json"]):
                            raise _Refused(200, "the collector's open-report answer has no report_id or no json")
                        report["id"] = answer["report_id"]
                        summary.reports += 1
                    return report["id"]

            async def send(mid: str, content: dict[str, Any]) -> None:
                nonlocal done
                try:
                    rid = await report_id(content)
                    for _ in range(3):
                        try:
                            answer = await client.post(f"/report/{rid}", {"format": "json",
                                                                          "content": content | {"report_id": rid}})
                            break
                        except _Refused as exc:
                            if exc.status not in GONE_STATUS:
                                raise
                            rid = await report_id(content, stale=rid)
                    else:
                        raise _Refused(409, "the collector keeps refusing the report")
                except _Refused as exc:
                    summary.refused += 1
                    summary.error(f"{mid}: {exc.reason}")
                    return
                cmid = answer.get("measurement_id")
                con.execute("INSERT INTO uploads SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM uploads "
                            "WHERE measurement_id = ? AND collector = ?)",
                            [mid, collector, cmid if isinstance(cmid, str) else None, rid,
                             dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), mid, collector])
                summary.uploaded += 1
                done += 1
                if on_progress:
                    on_progress(done, summary.pending_before)

            slots = asyncio.Semaphore(max(1, concurrency))

            async def limited(mid: str, content: dict[str, Any]) -> None:
                async with slots:
                    await send(mid, content)

            for start in range(0, len(ids), chunk):
                batch = envelopes(con, ids[start:start + chunk], scrub_ips)
                tasks = [asyncio.ensure_future(limited(mid, content)) for mid, content in batch]
                results = await asyncio.gather(*tasks, return_exceptions=True)
                failures = [r for r in results if isinstance(r, BaseException)]
                if failures:
                    if any(not isinstance(f, _Unreachable) for f in failures):
                        raise next(f for f in failures if not isinstance(f, _Unreachable))
                    summary.offline = True
                    summary.error(f"the collector is unreachable: {failures[0]}")
                    raise _Unreachable(str(failures[0]))
            if report["id"] is not None:
                try:
                    await client.post(f"/report/{report['id']}/close", None)
                except (_Refused, _Unreachable):
                    pass  # legacy (bk-003 3.3): measurements are stored whether or not it closes
    except _Unreachable:
        summary.offline = True
    finally:
        await session.close()
    summary.pending = pending_count(con, collector)
    return summary
