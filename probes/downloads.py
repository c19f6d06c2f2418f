"""Bounded downloads of the data Vantage fetches at run time (test lists,
geolocation databases, fingerprints): one place that caps the size, reads
in chunks and turns network errors into one short reason."""

from __future__ import annotations

import asyncio

import aiohttp


class DownloadFailed(Exception):
    """``status`` is the HTTP status when the server answered, else None."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


def describe(exc: BaseException) -> str:
    """One short reason for an error line; aiohttp messages can be long."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"network unreachable ({exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}".split("\n")[0]
    return str(exc).split("\n")[0] or type(exc).__name__


async def fetch_capped(session: aiohttp.ClientSession, url: str, limit: int, chunk_size: int = 64 * 1024) -> bytes:
    """GET ``url`` and return its body, refusing a non-200 answer or a body
    over ``limit`` bytes (read in chunks, so a huge answer never sits in memory)."""
    async with session.get(url) as resp:
        if resp.status != 200:
            raise DownloadFailed(f"HTTP {resp.status} from {url}", resp.status)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(chunk_size):
            size += len(chunk)
            if size > limit:
                raise DownloadFailed(f"{url} is larger than {limit // (1024 * 1024)} MB")
            chunks.append(chunk)
        return b"".join(chunks)
