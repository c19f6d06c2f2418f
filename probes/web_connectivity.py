"""Web Connectivity: DNS, TCP, TLS and HTTP for one URL, with a control.

Each step is a primitive that records its own observation; this module only
chains them and decides what to try next (no interpretation: that is
analysis/). The control request runs concurrently with the probe's own TCP,
TLS and HTTP steps.

``test_keys`` is filled in place, so that a measurement cut short by its
deadline still stores every step that finished.

Re-measure before accusing (as Censored Planet's Hyperquack does): a step
that failed the way a censor makes it fail (a connect refused, reset or timed
out; a TLS handshake reset, cut or timed out; an HTTP fetch reset, cut or
timed out) is tried again, up to ``ATTEMPTS`` times with a backoff, and every
attempt is recorded (``x_attempt``: 0 for the first try). One success on the
same path (endpoint, or the fetch) means the path is not blocked; the
analysis reads the attempts so. A retry is skipped when it could not finish
within ``RETRY_SHARE`` of the measurement's deadline. The cost:
docs/analysis.md, "Retries".
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from core import failures
from core.failures import OFFLINE
from core.net import endpoint, is_ip

from . import capture, dns, http, tcp, tls
from .context import ProbeContext
from .records import Clock, Transactions

TEST_NAME = "web_connectivity"
TEST_VERSION = "0.1.0"
MAX_ADDRESSES = 8  # every address the system resolver gave, up to a bound (DNS round-robin pools can be huge)

# Retries: failures that would be read as blocking, per step. Unroutable
# failures (no route, no IPv6) and certificate errors are answers, not
# accidents: they are not retried.
ATTEMPTS = 3          # tries of one step at most (the first included)
BACKOFF = 0.5         # seconds before the second try; doubled before each next one
RETRY_SHARE = 0.6     # retries must end within this share of the measurement's deadline (36 of 60 s):
                      # a fetch that hangs gets 2 tries (15 s each), a dropped connect 3 (8 s each)
TCP_RETRY = frozenset({failures.CONNECTION_REFUSED, failures.CONNECTION_RESET, failures.GENERIC_TIMEOUT})
TLS_RETRY = frozenset({failures.CONNECTION_RESET, failures.GENERIC_TIMEOUT, failures.EOF_ERROR})
HTTP_RETRY = frozenset({failures.CONNECTION_REFUSED, failures.CONNECTION_RESET, failures.GENERIC_TIMEOUT,
                        failures.EOF_ERROR})
# A fetch whose own TCP connect timed out on an address that accepted other
# connections in the same measurement lost its connection on a lossy path
# (a censor blocking the address blocks every connection to it): it gets more
# tries, within a larger share of the deadline (51 of 60 s: five tries when
# the first connect worked at once).
LOSSY_ATTEMPTS = 5
LOSSY_SHARE = 0.85
LOSSY_BACKOFF_MAX = 1.0


async def retry_gate(attempt: int, failure: str | None, retryable: frozenset, step_timeout: float, clock: Clock,
                     until: float | None) -> bool:
    """The retry rule of a step (the probe's and the helper's): after try
    ``attempt`` (0 first) failed with ``failure``, wait the backoff and say True
    when the step is tried again. Never when the failure is not ``retryable``,
    after ``ATTEMPTS`` tries, without ``until`` (no retries), or when the pause
    and another ``step_timeout`` would end past ``until`` (on ``clock``)."""
    if until is None or failure not in retryable or attempt + 1 >= ATTEMPTS:
        return False
    pause = BACKOFF * 2 ** attempt
    if clock.now() + pause + step_timeout > until:
        return False  # it could not finish in the time retries may take
    await asyncio.sleep(pause)
    return True


def new_test_keys() -> dict[str, Any]:
    return {
        "queries": [],
        "tcp_connect": [],
        "tls_handshakes": [],
        "requests": [],
        "network_events": [],
        "control": None,
        "control_failure": None,
        "x_control_helper": None,
        "x_probe_network_ok": None,
    }


async def measure(url: str, ctx: ProbeContext, keys: dict[str, Any], clock: Clock | None = None):
    """Measure ``url`` into ``keys`` (see new_test_keys).

    Returns a finisher coroutine: awaiting it collects the late DNS answers and
    the control response into ``keys``."""
    clock = clock or Clock()
    txids = Transactions()
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    t = ctx.timeouts

    # 1. DNS: system resolver, a UDP query we own (late answers = injection), DoH.
    # The UDP query keeps listening for late answers (dns_linger) in the
    # background while the TCP/TLS/HTTP steps go on; it is collected at the end.
    addresses: list[str] = []
    background: list[asyncio.Future] = []
    if is_ip(host):
        addresses = [host]
    else:
        system_task = asyncio.ensure_future(dns.system_lookup(host, clock=clock, txid=txids.next(), timeout=t.dns))
        if ctx.resolver:
            background.append(asyncio.ensure_future(
                dns.udp_lookup(host, ctx.resolver, "A", clock=clock, txid=txids.next(), timeout=t.dns, linger=ctx.dns_linger)))
        if ctx.doh_url and ctx.session is not None:
            background.append(asyncio.ensure_future(
                dns.doh_lookup(host, ctx.doh_url, "A", session=ctx.session, clock=clock, txid=txids.next(), timeout=t.dns)))
        system = await system_task
        keys["queries"].append(system)
        # The addresses a browser would use: the system resolver's; the UDP
        # resolver's first answers only when the system resolver gave nothing.
        addresses = dns.first_addresses([system])
        if not addresses and background:
            await _collect(background, keys)
            addresses = dns.first_addresses([q for q in keys["queries"] if q["engine"] in ("udp", "tcp")])
    addresses = addresses[:MAX_ADDRESSES]
    packet_capture = capture.start(ctx, addresses, port, clock)  # --capture: probes/capture.py

    # 2. Control, concurrently with everything below.
    control_task = None
    if ctx.helpers and ctx.session is not None:
        from .control import query_control

        control_task = asyncio.ensure_future(
            query_control(ctx.helpers, url, [endpoint(a, port) for a in addresses], session=ctx.session, timeout=getattr(t, "control", 30.0))
        )
    elif not ctx.helpers:
        keys["control_failure"] = "no_helper_configured"

    retry_until = t.measurement * RETRY_SHARE

    async def retry(attempt: int, failure: str | None, retryable: frozenset, step_timeout: float) -> bool:
        """Wait the backoff and say True when the step should be tried again (retry_gate)."""
        return await retry_gate(attempt, failure, retryable, step_timeout, clock, retry_until)

    lossy_until = t.measurement * LOSSY_SHARE

    async def fetch_page(pinned_ip: str | None, witness: bool, connected: list[str]) -> None:
        """4. HTTP, pinned to ``pinned_ip``; the whole fetch (redirects
        included) again when its last hop failed the censor's way, and more
        often when a lossy path explains the failure (lossy_connect)."""
        pinned = {host: pinned_ip} if pinned_ip is not None and not is_ip(host) else None
        attempt = 0
        while True:
            hops = await http.fetch(
                url, clock=clock, transactions=txids, timeouts=t, context=ctx.tls(), pinned=pinned,
                events=keys["network_events"], allow=ctx.allow,
            )
            for hop in hops:
                hop["x_attempt"] = attempt
            keys["requests"].extend(hops)
            if witness:
                return
            last = hops[-1].get("failure") if hops else None
            if hops and _still_flowing(hops[-1], keys["network_events"]):
                last = None  # slow, not stopped: the throttling test's question, and 15 s more each time
            if lossy_connect(hops, pinned_ip, connected):
                if not await retry_lossy(attempt):
                    return
            elif not await retry(attempt, last, HTTP_RETRY, t.http):
                return
            attempt += 1

    def lossy_connect(hops: list[dict[str, Any]], ip: str | None, connected: list[str]) -> bool:
        """The fetch's own TCP connect timed out (it never connected, and
        ended at the connect timeout, well before the hop's deadline) on an
        address that accepted TCP connections in this measurement: a censor
        blocking the address would have blocked those too; a lossy path
        explains it."""
        if len(hops) != 1 or ip is None or ip not in connected:
            return False
        hop = hops[0]
        return (hop.get("failure") == failures.GENERIC_TIMEOUT and not hop.get("x_address")
                and (hop.get("t") or 0.0) - (hop.get("t0") or 0.0) < t.http - 1.0)

    async def retry_lossy(attempt: int) -> bool:
        if attempt + 1 >= LOSSY_ATTEMPTS:
            return False
        pause = min(BACKOFF * 2 ** attempt, LOSSY_BACKOFF_MAX)
        if clock.now() + pause + t.http > lossy_until:
            return False
        await asyncio.sleep(pause)
        return True

    try:
        # 3. TCP to every address, TLS on each for https; the HTTP fetch (4.)
        # starts as soon as one address accepted a connection, alongside the
        # handshakes and the other addresses' retries.
        connected: list[str] = []  # addresses that accepted a TCP connection, in time order
        first: asyncio.Future = asyncio.get_running_loop().create_future()

        async def connect_one(ip: str) -> None:
            attempt = 0
            while True:
                entry, conn = await tcp.connect(ip, port, clock=clock, txid=txids.next(), timeout=t.connect)
                entry["x_attempt"] = attempt
                keys["tcp_connect"].append(entry)
                await tcp.close(conn)
                if conn is not None or not await retry(attempt, entry["status"]["failure"], TCP_RETRY, t.connect):
                    break
                attempt += 1
            if conn is None:
                return
            connected.append(ip)
            if not first.done():
                first.set_result(ip)
            if parts.scheme != "https":
                return
            attempt = 0
            while True:
                entry = await tls.handshake(ip, port, host, context=ctx.tls(), clock=clock, txid=txids.next(), timeout=t.tls)
                entry["x_attempt"] = attempt
                keys["tls_handshakes"].append(entry)
                if not await retry(attempt, entry.get("failure"), TLS_RETRY, t.connect + t.tls):
                    break
                attempt += 1

        steps = asyncio.gather(*(connect_one(ip) for ip in addresses))
        try:
            await asyncio.wait([first, steps], return_when=asyncio.FIRST_COMPLETED)
            if steps.done():
                steps.result()  # an error in a step is raised here
            pinned_ip = first.result() if first.done() else None
            witness = False
            timed_out = [c["ip"] for c in keys["tcp_connect"] if c["status"]["failure"] == failures.GENERIC_TIMEOUT]
            if pinned_ip is None and timed_out and clock.now() + t.connect <= retry_until:
                # No address accepted a connection on any try, and some timed
                # out: one fetch anyway, as a browser would, so that a lossy
                # path (which loses connections, never refuses them) gets one
                # more independent chance. It costs one connect timeout, only
                # on sites that look blocked, and only within the retries' share.
                pinned_ip, witness = timed_out[0], True
            if pinned_ip is not None or (not addresses and is_ip(host)):
                await fetch_page(pinned_ip, witness, connected)
            await steps
        except BaseException:
            _cancel([steps, first])
            raise
    except BaseException:
        _cancel(background + ([control_task] if control_task else []))
        capture.abandon(packet_capture)
        raise
    await capture.stop(packet_capture, keys, clock)
    # What is left (late DNS answers, the control) needs no slot of the runner:
    # it is awaited by the finisher while the next input is measured.
    return _finish(background, control_task, keys)


STILL_FLOWING = 2.0  # seconds: a timed-out body whose last byte came this close to the deadline was still arriving


def _still_flowing(hop: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """A fetch that timed out mid-body while bytes were still arriving (a slow
    site, a trickle): retrying it costs a whole HTTP timeout again and cannot
    tell more. A flow that went silent (a censor freezing it) is retried."""
    if hop.get("failure") != failures.GENERIC_TIMEOUT or not (hop.get("response") or {}).get("code"):
        return False
    txid = hop.get("transaction_id")
    last = max((e.get("t") or 0.0 for e in events
                if e.get("transaction_id") == txid and e.get("operation") == "bytes_received"), default=None)
    return last is not None and (hop.get("t") or 0.0) - last < STILL_FLOWING


def _cancel(tasks: list) -> None:
    for task in tasks:
        if not task.done():
            task.cancel()


async def _finish(background: list[asyncio.Future], control_task: asyncio.Future | None, keys: dict[str, Any]) -> None:
    try:
        await _collect(background, keys)
        if control_task is not None:
            response, helper, failure = await control_task
            keys["control"] = response
            keys["x_control_helper"] = helper
            keys["control_failure"] = failure
        keys["x_probe_network_ok"] = probe_network_ok(keys)
    finally:
        _cancel(background + ([control_task] if control_task else []))


async def _collect(tasks: list[asyncio.Future], keys: dict[str, Any]) -> None:
    """Add the results of background DNS lookups (once) to ``queries``."""
    while tasks:
        result = await tasks.pop(0)
        keys["queries"].extend(result if isinstance(result, list) else [result])


def probe_network_ok(keys: dict[str, Any]) -> bool:
    """False when the probe itself looks offline: nothing succeeded and the
    failures are of the 'no network' kind (or the control was unreachable too)."""
    ops = keys["queries"] + [{"failure": c["status"]["failure"]} for c in keys["tcp_connect"]] + keys["requests"]
    if any(op.get("failure") is None for op in ops):
        return True
    seen = {op.get("failure") for op in ops}
    if seen & OFFLINE:
        return False
    # Every step failed (e.g. DNS timeouts everywhere) and no control answered:
    # we cannot tell censorship from a dead uplink.
    return not (keys.get("control") is None and keys.get("control_failure") not in (None, "no_helper_configured"))


def outcome_label(keys: dict[str, Any]) -> str:
    """A probe-side label for the progress bar (not a verdict)."""
    if keys.get("x_probe_network_ok") is False:
        return "no network"
    reqs = keys["requests"]
    if reqs and reqs[-1].get("failure") is None:
        return "fetched"
    for name, section in (("tls", keys["tls_handshakes"]), ("tcp", keys["tcp_connect"])):
        for entry in section:
            failure = entry.get("failure") if name == "tls" else entry["status"]["failure"]
            if failure:
                return f"{name} failure"
    if keys["queries"] and not any(q.get("answers") for q in keys["queries"]):
        return "dns failure"
    return "http failure" if reqs else "no attempt"
