"""Admission and counting: the bounded body reader, the in-flight cap, the
per-client rate limit (services/limits.py, shared with the helper: a keyed
hash of the address, never the address), and the Prometheus metrics."""

from __future__ import annotations

import collections
from typing import Callable

from aiohttp import web

from ..limits import BodyRejected, InFlight, RateLimiter, client_address, read_capped  # shared with the helper
from .protocol import Reject

__all__ = ["BODY_READ_SECONDS", "InFlight", "Metrics", "RateLimiter", "client_address", "read_body"]

# A client dribbling its body would hold an in-flight slot for as long as it liked.
BODY_READ_SECONDS = 30.0


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond), received
    within BODY_READ_SECONDS (408)."""
    try:
        return await read_capped(request, limit, BODY_READ_SECONDS, 256 * 1024)
    except BodyRejected as exc:
        raise Reject(exc.status, str(exc)) from None


class Metrics:
    """Counters (by label) and gauges (read when scraped), as Prometheus text."""

    def __init__(self) -> None:
        self.counters: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.help: dict[str, str] = {}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def inc(self, name: str, labels: tuple[tuple[str, str], ...] = (), by: float = 1) -> None:
        self.counters[name][labels] += by

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines = []
        for name, counter in sorted(self.counters.items()):
            lines.append(f"# HELP {name} {self.help.get(name, name)}")
            lines.append(f"# TYPE {name} counter")
            for labels, value in sorted(counter.items()):
                label = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{label}}} {value:g}" if label else f"{name} {value:g}")
        for name, (help_text, read) in sorted(self.gauges.items()):
            try:
                value = float(read())
            except Exception:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
