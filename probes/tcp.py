"""TCP primitive: one connect attempt, one ``tcp_connect`` entry, never an exception.

The failure tells the censorship methods apart: ``connection_refused`` (RST to
the SYN), ``generic_timeout_error`` (SYN dropped), ``host_unreachable`` /
``network_unreachable`` (ICMP errors, or an offline probe).
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import failures
from .records import Clock, tcp_connect

# Connect failures that belong to the address rather than the request: the
# address refuses, drops or cannot be routed to. A caller with another address
# tries it next; one without gives the address up.
ADDRESS_FAILURES = frozenset({
    failures.CONNECTION_REFUSED, failures.GENERIC_TIMEOUT, failures.HOST_UNREACHABLE, failures.NETWORK_UNREACHABLE,
})


async def connect(
    ip: str, port: int, *, clock: Clock, txid: int, timeout: float,
) -> tuple[dict[str, Any], tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
    """Connect to ``ip:port``. On success the caller owns (and must close) the
    returned streams; on failure the second element is None."""
    t0 = clock.now()
    streams = None
    failure: str | None = None
    try:
        async with asyncio.timeout(timeout):
            streams = await asyncio.open_connection(ip, port)
    except Exception as exc:  # a network outcome, recorded not raised
        failure = failures.classify(exc)
    entry = tcp_connect(ip=ip, port=port, failure=failure, t0=t0, t=clock.now(), transaction_id=txid)
    return entry, streams


async def close(streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    """Close streams from :func:`connect`, ignoring a peer that already went away."""
    if streams is None:
        return
    writer = streams[1]
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except Exception:  # already reset or closed by the peer: nothing left to do
        pass
