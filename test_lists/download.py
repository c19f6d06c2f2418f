"""Downloading Citizen Lab test lists into the cache (`vantage lists update`).

All requested lists are fetched and validated first, and only then renamed
into place: a run that fails half-way (offline, 404, malformed file) leaves the
previously downloaded lists exactly as they were, never a truncated file.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import aiohttp

from core.download import DownloadFailed, describe, fetch_capped, install_atomically

from .loader import ListError, cache_dir, parse_csv

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/citizenlab/test-lists/master/lists/"
BASE_URL_ENV = "VANTAGE_TEST_LISTS_URL"
MAX_LIST_BYTES = 20 * 1024 * 1024  # global.csv is ~150 kB; anything this big is not a list
DEFAULT_TIMEOUT = 30.0


class DownloadError(ListError):
    """The lists could not be fetched; nothing in the cache was changed."""


@dataclass(frozen=True)
class Downloaded:
    name: str
    path: Path
    entries: int


def base_url() -> str:
    url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def list_names(countries: Iterable[str] = ()) -> list[str]:
    """``global`` plus each requested country (or ``cis``), validated and lower-cased."""
    names = ["global"]
    for cc in countries:
        low = cc.strip().lower()
        if low != "cis" and not re.fullmatch(r"[a-z]{2}", low):
            raise ListError(f"'{cc}' is not a two-letter country code")
        if low not in names:
            names.append(low)
    return names


async def _fetch(session: aiohttp.ClientSession, url: str, name: str) -> bytes:
    try:
        return await fetch_capped(session, url, MAX_LIST_BYTES)
    except DownloadFailed as exc:
        if exc.status == 404:
            what = "global list" if name == "global" else f"list for '{name}'"
            raise DownloadError(f"cannot download the test lists: no {what} at {url} (HTTP 404)") from None
        raise DownloadError(f"cannot download the test lists: {exc}") from None


async def download_lists(
    countries: Iterable[str] = (),
    dest: str | os.PathLike | None = None,
    base: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Downloaded]:
    """Fetch global.csv and the country lists into ``dest`` (default: the cache)."""
    names = list_names(countries)
    target = Path(dest) if dest else cache_dir()
    root = base or base_url()
    root = root if root.endswith("/") else root + "/"
    bodies: dict[str, bytes] = {}
    try:
        # trust_env: honour HTTP(S)_PROXY, since raw.githubusercontent.com is
        # itself blocked in some countries and volunteers may need a proxy.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True) as session:
            results = await asyncio.gather(
                *(_fetch(session, f"{root}{name}.csv", name) for name in names), return_exceptions=True
            )
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise DownloadError(f"cannot download the test lists: {describe(exc)}") from None
    for name, result in zip(names, results):
        if isinstance(result, DownloadError):
            raise result
        if isinstance(result, BaseException):
            if not isinstance(result, (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)):
                raise result
            raise DownloadError(f"cannot download the test lists: {describe(result)} "
                                f"({root}{name}.csv)") from None
        bodies[name] = result

    # Validate everything before touching the cache.
    parsed: dict[str, int] = {}
    for name, body in bodies.items():
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DownloadError(f"the downloaded {name}.csv is not UTF-8 text; cache left unchanged") from None
        try:
            parsed[name] = len(parse_csv(text, f"{name}.csv (downloaded)"))
        except ListError as exc:
            raise DownloadError(f"{exc}; cache left unchanged") from None

    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the list cache {target}: {exc.strerror}") from None
    try:
        install_atomically(target, {f"{name}.csv": body for name, body in bodies.items()})
    except OSError as exc:
        raise DownloadError(f"cannot write the list cache {target}: {exc.strerror or exc}") from None
    return [Downloaded(name, target / f"{name}.csv", parsed[name]) for name in names]


def update_lists(countries: Iterable[str] = (), **kwargs) -> list[Downloaded]:
    """Synchronous wrapper for the CLI."""
    return asyncio.run(download_lists(countries, **kwargs))
