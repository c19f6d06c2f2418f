"""Bounded downloads of the data Vantage fetches at run time (test lists,
geolocation databases, fingerprints): one place that caps the size, reads
in chunks and turns network errors into one short reason. And the atomic
file-system steps that install what was fetched or written (an install of a
set of files, a directory fsync, a directory swap)."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import VantageError

if TYPE_CHECKING:
    import aiohttp

# aiohttp is imported where it is used: the probe's database process
# (probes/spool.py) imports this module for fsync_dir and never downloads.


class DownloadFailed(VantageError):
    """``status`` is the HTTP status when the server answered, else None."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


def describe(exc: BaseException) -> str:
    """One short reason for an error line; aiohttp messages can be long."""
    import aiohttp

    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
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


def install_atomically(target: Path, files: dict[str, bytes], check: Callable[[str, str], None] | None = None) -> None:
    """Write every file to a temporary name in ``target``, ``check(name, tmp)``
    each, then rename them all into place: a failure leaves the old files as
    they were, never a half-written set. Raises OSError (and what ``check``
    raises)."""
    temps: dict[str, str] = {}
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target)
            temps[name] = tmp
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if check:
                check(name, tmp)
        for name, tmp in temps.items():
            os.replace(tmp, target / name)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so the names created, renamed or deleted in it are
    on disk (the probe's spool and the collector's spool)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2():
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, or not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(new: str | os.PathLike, old: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with
    RENAME_EXCHANGE), so a reader sees either the old directory or the new
    one, never neither: replacing a non-empty directory takes two renames
    otherwise. Returns False where the system or file system cannot (the
    caller falls back to two renames); raises OSError for other failures."""
    import ctypes

    function = _renameat2()
    if function is None:
        return False
    at_cwd = -100  # AT_FDCWD
    if function(at_cwd, os.fsencode(new), at_cwd, os.fsencode(old), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, flag unknown, file system cannot
        return False
    raise OSError(error, os.strerror(error), os.fspath(new))
