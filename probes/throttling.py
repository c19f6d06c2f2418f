"""Throttling: is this site slowed down because of its name, or its address?

Method (docs/throttling.md): resolve the host once, then run ``rounds`` pairs
of time-bounded, byte-capped downloads from the *same* address:

- ``target``: SNI = host, ``Host: host`` — what a browser sends;
- ``scrambled``: SNI = a random name under example.net (RFC 2606, never a real
  site) with certificate verification off, and the real ``Host`` header inside
  the encrypted channel, so the server still serves the page but an on-path
  censor only sees an unrelated name. This is the "scrambled" control of
  record-and-replay throttling studies: same server, same path, same bytes,
  different trigger. For ``http://`` URLs there is no SNI, so the scrambled
  variant can only change the ``Host`` header and the server may then serve
  something else; analysis checks that the two responses are comparable.

The pairs are interleaved in ABBA order (T S, S T, T S, ...) so that path
changes, cross traffic and per-destination TCP metrics caching hit both
variants alike. Concurrently, the control helper is asked for its own download
of the URL (``x_throughput`` extension of the TH request), the "fast from
elsewhere" evidence of address-based throttling.

Each download is a probes/timed_download.py download (wire bytes timestamped,
per-bin samples), the same code the helper measures its sample with.

No interpretation here (analysis/throttling.py decides): each download is one
``x_throughput`` entry {side, variant, attempt, ip, server_name, failure,
bytes, seconds, kbit_per_s} plus ``x_`` details (arrival trace, per-bin
throughput samples, status code, why it stopped).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import string
from dataclasses import dataclass
from typing import Any

from core.failures import OFFLINE
from core.net import endpoint, is_ip

from . import dns, failures, tls
from .context import ProbeContext
from .records import Clock, Transactions
from .tcp import ADDRESS_FAILURES
from .timed_download import Bounds, parse_target, pick_address, timed_download

TEST_NAME = "throttling"
TEST_VERSION = "0.1.0"

SCRAMBLED_SUFFIX = "example.net"  # reserved by RFC 2606: no censor lists it, no site answers to it
# A Vantage helper answers an ``x_throughput`` request within ``seconds`` plus
# this much (DNS, connect, TLS and the request: 5 s; closing: 1 s; see
# docs/helper.md). The probe's control timeout must leave room for it.
HELPER_OVERHEAD = 6.0
# On top of that: the POST round trip and a helper that queues the request.
CONTROL_SLACK = 5.0


@dataclass(frozen=True)
class Settings:
    """Knobs of the test; defaults are what `vantage run throttling` uses.

    4 rounds x 2 variants x 2 s keeps a URL under ~20 s while giving each
    variant 4 downloads (40 throughput samples of 200 ms when time-bound).
    The byte cap bounds a volunteer's data use to 8 x 2 MiB per URL."""

    rounds: int = 4
    download_seconds: float = 2.0
    max_bytes: int = 2 * 1024 * 1024
    bin_seconds: float = 0.2
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    helper_seconds: float = 3.0
    # From the start of the measurement. A helper answers within
    # helper_seconds + HELPER_OVERHEAD (9 s); 20 s leaves CONTROL_SLACK and the
    # probe's own DNS lookup on top, while a helper that never answers costs
    # at most ~2 s beyond our own (~17 s of time-bound) downloads.
    helper_timeout: float = 20.0
    helper_grace: float = 2.0     # after our own downloads, whatever the above

    def bounds(self) -> Bounds:
        """What each of the test's own downloads may take."""
        return Bounds(seconds=self.download_seconds, max_bytes=self.max_bytes, bin_seconds=self.bin_seconds,
                      connect_timeout=self.connect_timeout, handshake_timeout=self.handshake_timeout)

    def control_room(self) -> float:
        """Seconds the control timeout leaves beyond the helper's answer bound
        (negative: a conforming helper may be cut off)."""
        return self.helper_timeout - (self.helper_seconds + HELPER_OVERHEAD)


DEFAULT = Settings()


def new_test_keys() -> dict[str, Any]:
    return {
        "queries": [],
        "tcp_connect": [],
        "tls_handshakes": [],
        "x_throughput": [],
        "control": None,
        "control_failure": None,
        "x_control_helper": None,
        "x_probe_network_ok": None,
        "x_settings": None,
    }


def scrambled_name() -> str:
    """An unrelated, random, syntactically valid host name."""
    alphabet = string.ascii_lowercase + string.digits
    label = secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(11))
    return f"{label}.{SCRAMBLED_SUFFIX}"


async def measure(url: str, ctx: ProbeContext, keys: dict[str, Any], clock: Clock | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """Measure ``url`` into ``keys`` (see new_test_keys); fills keys in place so
    that a measurement cut by the runner's deadline keeps what finished."""
    clock = clock or Clock()
    settings = settings or DEFAULT
    txids = Transactions()
    host, port, https, host_header, path = parse_target(url)
    keys["x_settings"] = {
        "rounds": settings.rounds, "download_seconds": settings.download_seconds, "max_bytes": settings.max_bytes,
        "bin_seconds": settings.bin_seconds, "helper_seconds": settings.helper_seconds,
    }

    # 1. One address for every download: the comparison is "same server,
    #    different name", so the address must not change between variants.
    if is_ip(host):
        addresses = [host]
    else:
        query = await dns.system_lookup(host, clock=clock, txid=txids.next(), timeout=ctx.timeouts.dns)
        keys["queries"].append(query)
        addresses = dns.first_addresses([query])
    ip = pick_address(addresses)

    # 2. The helper's download, concurrently (it does not share our path).
    control_task = None
    if ctx.helpers and ctx.session is not None:
        from .control import query_control

        extra = {"x_throughput": {"seconds": settings.helper_seconds, "max_bytes": settings.max_bytes}}
        control_task = asyncio.ensure_future(query_control(
            ctx.helpers, url, [endpoint(ip, port)] if ip else [], session=ctx.session,
            timeout=settings.helper_timeout, extra=extra,
        ))
    elif not ctx.helpers:
        keys["control_failure"] = "no_helper_configured"
    else:
        keys["control_failure"] = "control_unreachable: no_session"

    try:
        if ip is not None:
            await _rounds(ip, port, https, host, host_header, path, ctx, keys, clock, txids, settings)
    finally:
        if control_task is not None:
            # The control only matters for throttle.ip: do not let a busy
            # helper double the test's duration. It gets `helper_timeout` from
            # the start, and at least `helper_grace` once our downloads end.
            budget = max(settings.helper_timeout - clock.now(), settings.helper_grace)
            done, _ = await asyncio.wait({control_task}, timeout=budget)
            if not done:
                control_task.cancel()
                await asyncio.gather(control_task, return_exceptions=True)
                response, helper, failure = None, None, f"control_unreachable: {failures.GENERIC_TIMEOUT}"
            else:
                response, helper, failure = control_task.result()
            keys["control"] = response
            keys["x_control_helper"] = helper
            keys["control_failure"] = failure
            if response is not None and not response.get("x_throughput"):
                # The helper answered but does not implement the extension.
                keys["control_failure"] = "control_no_throughput"
    keys["x_probe_network_ok"] = _network_ok(keys)
    return keys


async def _rounds(ip, port, https, host, host_header, path, ctx, keys, clock, txids, settings) -> None:
    target_ctx = ctx.tls() if https else None
    scrambled_ctx = tls.unverified_context(target_ctx) if https else None
    for attempt in range(settings.rounds):
        # ABBA order: neither variant always goes first.
        order = ("target", "scrambled") if attempt % 2 == 0 else ("scrambled", "target")
        round_failures = []
        for variant in order:
            if variant == "target":
                sni, header, tls_ctx = (host if https else None), host_header, target_ctx
            else:
                fake = scrambled_name()
                # https: only the SNI changes, the real Host travels encrypted.
                # http: nothing is encrypted, so the Host must change instead.
                sni, header, tls_ctx = (fake if https else None), (host_header if https else fake), scrambled_ctx
            entry = await timed_download(
                ip, port, tls_context=tls_ctx, server_name=sni, host_header=header, path=path, clock=clock,
                txid=txids.next(), bounds=settings.bounds(), keys=keys,
            )
            entry["variant"] = variant
            entry["attempt"] = attempt
            keys["x_throughput"].append(entry)
            round_failures.append(entry["failure"])
        # An address that refuses or drops both variants will not recover in
        # the next round: stop rather than spend the whole deadline timing out.
        if all(f is not None for f in round_failures) and any(f in ADDRESS_FAILURES for f in round_failures):
            break


def _network_ok(keys: dict[str, Any]) -> bool:
    """False when nothing worked and the failures say the probe is offline."""
    ops = keys["queries"] + keys["x_throughput"]
    if any(op.get("failure") is None for op in ops):
        return True
    return not ({op.get("failure") for op in ops} & OFFLINE)


def outcome_label(keys: dict[str, Any]) -> str:
    """A probe-side hint for the progress bar (the verdict is analysis's job)."""
    if keys.get("x_probe_network_ok") is False:
        return "no network"
    by_variant: dict[str, list[float]] = {"target": [], "scrambled": []}
    for e in keys.get("x_throughput") or []:
        if e.get("failure") is None and e.get("kbit_per_s") is not None and e.get("variant") in by_variant:
            by_variant[e["variant"]].append(e["kbit_per_s"])
    if not by_variant["target"]:
        return "target download failed" if keys.get("x_throughput") else "no download"
    if not by_variant["scrambled"]:
        return "scrambled download failed"
    target, scrambled = statistics.median(by_variant["target"]), statistics.median(by_variant["scrambled"])
    if scrambled and target <= 0.5 * scrambled:
        return "target slower"
    return "similar speed"
