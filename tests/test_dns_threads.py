"""probes.dns.in_daemon_thread: idle daemon threads are reused, a busy one is
never waited for, and a forked child starts with none of its parent's."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from probes import dns


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vantage-getaddrinfo"]


async def test_idle_threads_are_reused():
    await dns.in_daemon_thread(lambda: None)
    before = len(_workers())
    for i in range(50):
        assert await dns.in_daemon_thread(lambda x: x * 2, i) == i * 2
    assert len(_workers()) <= before + 1
    assert all(t.daemon for t in _workers())


async def test_a_stuck_call_does_not_hold_the_next_one():
    release = threading.Event()
    stuck = asyncio.ensure_future(dns.in_daemon_thread(release.wait, 30))
    await asyncio.sleep(0.05)
    try:
        # Every idle thread is busy or taken: this call gets a thread of its own.
        results = await asyncio.wait_for(asyncio.gather(*(dns.in_daemon_thread(lambda v=v: v) for v in range(5))), 5)
        assert results == list(range(5))
        assert not stuck.done()
    finally:
        release.set()
    assert await stuck is True


async def test_errors_reach_the_caller():
    def boom():
        raise OSError("no")

    with pytest.raises(OSError, match="no"):
        await dns.in_daemon_thread(boom)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
async def test_a_forked_child_starts_its_own_threads():
    await dns.in_daemon_thread(lambda: None)  # the parent now has an idle thread
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            async def child():
                return await asyncio.wait_for(dns.in_daemon_thread(lambda: 42), 5)

            code = 0 if asyncio.new_event_loop().run_until_complete(child()) == 42 else 1
        finally:
            os._exit(code)
    os.close(read_fd)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
