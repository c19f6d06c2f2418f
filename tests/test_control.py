"""The probe's control client: helpers tried in order, every kind of bad helper skipped."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

import servers
from probes.control import DEFAULT_HEADERS, control_request, query_control

GOOD = {"dns": {"failure": None, "addrs": ["127.0.0.1"]}, "tcp_connect": {}, "tls_handshake": {},
        "http_request": {"status_code": 200, "body_length": 10, "failure": None, "title": "", "headers": {}}}


class FakeHelper:
    """A loopback helper with one fixed behaviour; records request bodies."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.bodies: list[dict] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        if self.behaviour == "503":
            return web.json_response({"error": "overloaded"}, status=503)
        if self.behaviour == "slow":
            await asyncio.sleep(5)
        if self.behaviour == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if self.behaviour == "wrong-shape":
            return web.json_response(["not", "an", "object"])
        return web.json_response(GOOD)

    async def __aenter__(self) -> "FakeHelper":
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner, base = await servers.serve_app(app, access_log=None, shutdown_timeout=0.1)
        self.url = base + "/"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


async def test_request_body_is_ts017_shaped():
    body = control_request("https://example.org/", ["192.0.2.1:443"], extra={"x_throughput": {"seconds": 1}})
    assert body["http_request"] == "https://example.org/"
    assert body["tcp_connect"] == ["192.0.2.1:443"]
    assert body["http_request_headers"] == DEFAULT_HEADERS
    assert all(isinstance(v, list) for v in body["http_request_headers"].values())
    assert body["x_quic_enabled"] is False and body["x_throughput"] == {"seconds": 1}


async def test_first_good_helper_after_bad_ones_is_used():
    dead = f"http://127.0.0.1:{servers.closed_port()}/"
    async with FakeHelper("503") as busy, FakeHelper("slow") as slow, FakeHelper("garbage") as garbage, \
            FakeHelper("wrong-shape") as wrong, FakeHelper("ok") as good, FakeHelper("ok") as unused:
        async with aiohttp.ClientSession() as session:
            started = asyncio.get_running_loop().time()
            response, used, failure = await query_control(
                [dead, busy.url, slow.url, garbage.url, wrong.url, good.url, unused.url],
                "http://site.test/", ["127.0.0.1:80"], session=session, timeout=0.5,
            )
            elapsed = asyncio.get_running_loop().time() - started
    assert failure is None and used == good.url and response == GOOD
    assert elapsed < 3, "the slow helper must be abandoned at the timeout"
    assert good.bodies[0]["tcp_connect"] == ["127.0.0.1:80"]
    assert unused.bodies == []


@pytest.mark.parametrize("behaviour, expected", [
    ("503", "control_unreachable: http_status_503"),
    ("slow", "control_unreachable: generic_timeout_error"),
    ("garbage", "control_unreachable: invalid_json"),
    ("wrong-shape", "control_unreachable: invalid_response"),
])
async def test_failure_names_the_last_helper_failure(behaviour, expected):
    dead = f"http://127.0.0.1:{servers.closed_port()}/"
    async with FakeHelper(behaviour) as bad:
        async with aiohttp.ClientSession() as session:
            result = await query_control([dead, bad.url], "http://site.test/", [], session=session, timeout=0.5)
    assert result == (None, None, expected)


async def test_unreachable_and_no_helpers():
    dead = f"http://127.0.0.1:{servers.closed_port()}/"
    async with aiohttp.ClientSession() as session:
        assert await query_control([dead], "http://a.test/", [], session=session, timeout=1) == (
            None, None, "control_unreachable: connection_refused")
        assert await query_control([], "http://a.test/", [], session=session, timeout=1) == (
            None, None, "control_unreachable: no_helper_configured")


async def test_runs_concurrently_with_other_work():
    async with FakeHelper("ok") as good:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(
                query_control([good.url], f"http://s{i}.test/", [], session=session, timeout=2) for i in range(20)
            ))
    assert all(r[0] == GOOD for r in results)
    assert sorted(b["http_request"] for b in good.bodies) == sorted(f"http://s{i}.test/" for i in range(20))
    json.dumps(results)  # plain JSON values only: the response is stored in the record as is
