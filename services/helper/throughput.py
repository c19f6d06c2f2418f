"""``x_throughput``: the helper's own timed download of the request's URL,
measured by the probe's code (probes/timed_download.py: wire bytes from the
request, 200 ms samples), so the probe can tell address-based throttling
from a slow site by comparing its rate with this one."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from core import failures
from core.net import Policy
from probes.records import Clock, Transactions
from probes.timed_download import Bounds, parse_target, pick_address, timed_download
from probes.timeouts import Timeouts

from .protocol import ControlRequest, throughput_sample

# An x_throughput request is answered within ``seconds`` + setup + close from
# its arrival (probes/throttling.py HELPER_OVERHEAD is their sum): DNS,
# connect, TLS and sending the request must fit in the setup allowance, the
# timed part is ``seconds`` from the request, closing takes at most 1 s.
SETUP_SECONDS = 5.0
CLOSE_SECONDS = 1.0
# The sample's own bounds end this much before the answer's, so event-loop lag
# never lets the request deadline cut a finished sample.
MARGIN = 0.5
# With x_throughput, the page fetch reads only this much of the body (enough
# for the title and a fingerprint of its start): the timed download stands in
# for the rest, and a full 512 KiB fetch would compete with it for bandwidth.
FETCH_BODY = 32 * 1024
_COPIED = ("bytes", "seconds", "kbit_per_s", "failure", "x_status_code", "x_content_length", "x_body_bytes",
           "x_stopped", "x_ttfb", "x_bin_seconds", "x_samples_kbit")


def answer_bound(seconds: float) -> float:
    """How long a request with ``x_throughput.seconds`` may take to answer."""
    return seconds + SETUP_SECONDS + CLOSE_SECONDS


async def sample(req: ControlRequest, addrs: list[str], dns_failure: str | None, *, policy: Policy,
                 context: ssl.SSLContext, timeouts: Timeouts, clock: Clock, txids: Transactions,
                 setup_deadline: float) -> dict[str, Any]:
    """The request's URL (no redirects, as the probe's own downloads) from the
    allowed address of the helper's lookup the probe would pick (pick_address).
    Connect and TLS must finish by ``setup_deadline`` (loop time); reading
    stops ``seconds`` after the request or at ``max_bytes``."""
    seconds, max_bytes = req.throughput["seconds"], req.throughput["max_bytes"]
    https = req.scheme == "https"
    result = throughput_sample(req.host)
    allowed = [d.address for d in map(policy.check, addrs) if d.allowed]
    if dns_failure or not addrs:
        result["failure"] = dns_failure or failures.DNS_NO_ANSWER
        return result
    if not allowed:
        result.update(ip=addrs[0], failure=failures.ADDRESS_REFUSED)
        return result
    ip = pick_address(allowed)
    result["ip"] = ip
    remaining = setup_deadline - asyncio.get_running_loop().time()
    if remaining < 0.1:
        result["failure"] = failures.GENERIC_TIMEOUT
        return result
    bounds = Bounds(
        seconds=seconds, max_bytes=max_bytes,
        connect_timeout=min(timeouts.connect, remaining / 2 if https else remaining),
        handshake_timeout=min(timeouts.tls, remaining / 2),
    )
    where = parse_target(req.url)
    entry = await timed_download(
        ip, where.port, tls_context=context if https else None, server_name=req.host if https else None,
        host_header=where.host_header, path=where.path, clock=clock, txid=txids.next(), bounds=bounds,
    )
    result.update({key: entry.get(key) for key in _COPIED})
    return result
