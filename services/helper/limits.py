"""Admission control: who is asking (a keyed client key, never the address),
how often (a token bucket per client), how many at once (the in-flight
limit), and how big and slow a request body may be."""

from __future__ import annotations

from aiohttp import web

from ..limits import BodyRejected, InFlight, RateLimiter, client_address, read_capped  # shared with the collector
from .protocol import BadRequest

__all__ = ["BODY_READ_SECONDS", "InFlight", "RateLimiter", "client_address", "read_body"]

# A client that dribbles its body would otherwise hold an in-flight slot for
# as long as it likes.
BODY_READ_SECONDS = 10.0


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, received within
    BODY_READ_SECONDS; BadRequest otherwise."""
    try:
        return await read_capped(request, limit, BODY_READ_SECONDS, 16 * 1024)
    except BodyRejected as exc:
        raise BadRequest(str(exc)) from None
