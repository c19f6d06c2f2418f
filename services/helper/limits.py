"""Admission control: who is asking (a keyed client key, never the address),
how often (a token bucket per client), how many at once (the in-flight
limit), and how big and slow a request body may be."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..limits import RateLimiter, client_address  # shared with the collector
from .protocol import BadRequest

__all__ = ["BODY_READ_SECONDS", "InFlight", "RateLimiter", "client_address", "read_body"]

# A client that dribbles its body would otherwise hold an in-flight slot for
# as long as it likes.
BODY_READ_SECONDS = 10.0


class InFlight:
    """At most ``limit`` requests measured at once; the rest are shed (and
    counted), which keeps latency bounded for the ones accepted."""

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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, received within
    BODY_READ_SECONDS; BadRequest otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(f"request body larger than {limit} bytes")
    body = bytearray()
    deadline = asyncio.get_running_loop().time() + BODY_READ_SECONDS
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await request.content.read(16 * 1024)
        except TimeoutError:
            raise BadRequest("request body not received in time") from None
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"request body larger than {limit} bytes")
