"""Admission limits shared by the helper and the collector: who is asking (a
keyed client key, never the address), how often (a token bucket per
client), how many at once (the in-flight cap), and how big and slow a
request body may be (the bounded body reader)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import time

from aiohttp import web


def client_address(request: web.Request, trust_forwarded_for: bool) -> str:
    """The address the rate limit is keyed by: the peer, or behind our own
    reverse proxy the last X-Forwarded-For entry."""
    if trust_forwarded_for:
        # The proxy appends its own line (HAProxy) or entry: the last one
        # is the one the client cannot forge.
        lines = request.headers.getall("X-Forwarded-For", [])
        forwarded = lines[-1] if lines else None
        if forwarded:
            # The last entry is the one our own proxy appended; earlier ones
            # are whatever the client chose to send.
            return forwarded.split(",")[-1].strip()
    return request.remote or "unknown"


class RateLimiter:
    """Token bucket per client, keyed by a keyed hash of the client address.

    The key (random per process) makes the stored digests useless for recovering
    addresses — there are only 2^32 IPv4 addresses, so an unkeyed hash would not
    protect anyone — and unlinkable across restarts. Each bucket holds a
    minute's worth of requests and refills continuously.
    """

    MAX_CLIENTS = 100_000

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._salt = os.urandom(32)
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # digest -> (tokens, updated)

    def _key(self, address: str) -> bytes:
        # An IPv6 client owns at least a /64: one bucket per /64, or rotating
        # addresses would escape the limit.
        try:
            ip = ipaddress.ip_address(address)
            if ip.version == 6:
                address = str(ipaddress.ip_network(f"{ip}/64", strict=False))
        except ValueError:
            pass
        return hmac.new(self._salt, address.encode(), hashlib.sha256).digest()[:16]

    def _prune(self, now: float) -> None:
        # A bucket idle long enough to be full again carries no information.
        full_after = self.capacity / self.rate if self.rate else 0
        for key in [k for k, (_, updated) in self._buckets.items() if now - updated >= full_after]:
            del self._buckets[key]

    def allow(self, address: str) -> tuple[bool, float]:
        """(allowed, seconds until the next token when refused)."""
        if self.capacity <= 0:
            return True, 0.0
        now = self._clock()
        key = self._key(address)
        tokens, updated = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False, (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_CLIENTS:
            self._prune(now)
            # Still full (clients rotating faster than buckets refill): drop
            # the oldest half; dicts keep insertion order.
            if len(self._buckets) > self.MAX_CLIENTS:
                for stale in list(self._buckets)[: len(self._buckets) // 2]:
                    del self._buckets[stale]
        return True, 0.0

    def __len__(self) -> int:
        return len(self._buckets)


class InFlight:
    """At most ``limit`` requests at once (each may hold a body of up to the
    size cap): memory and latency stay bounded under any load; the rest are
    refused and counted in ``shed``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.shed = 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            self.shed += 1
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


class BodyRejected(Exception):
    """A request body refused: ``status`` 413 (too large) or 408 (too slow) and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


async def read_capped(request: web.Request, limit: int, seconds: float, chunk_size: int) -> bytes:
    """The request body, at most ``limit`` bytes, received within ``seconds``
    (a client dribbling its body would otherwise hold an in-flight slot for as
    long as it liked), read ``chunk_size`` bytes at a time; BodyRejected otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyRejected(413, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.read(chunk_size)
        except TimeoutError:
            raise BodyRejected(408, "request body not received in time") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise BodyRejected(413, f"request body larger than {limit} bytes")
        chunks.append(chunk)
