"""The control helper, end to end on loopback: protocol shape, SSRF defence,
limits, privacy. Names resolve through a loopback DNS server (never the
system resolver) and a guard fails any connect to a non-loopback address."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

import servers
from shared import SHARED, shared_path
from probes.control import query_control
from services.helper import (
    FLAG_BOGON, FLAG_RESOLVED_BY_PROBE, FLAG_RESOLVED_BY_TH, FLAG_VALID_FOR_DOMAIN, Helper, HelperConfig,
    RateLimiter, simhash, start,
)

SPEC = SHARED / "data" / "ooni-spec" / "nettests" / "ts-017-web-connectivity.md"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any attempt to connect outside loopback fails the test loudly — the
    SSRF cases below name 10.0.0.1 and 169.254.169.254 and must never reach them."""
    original = socket.socket.connect
    original_ex = socket.socket.connect_ex

    def check(address):
        if isinstance(address, tuple):
            ip = ipaddress.ip_address(address[0].split("%")[0])
            if not ip.is_loopback and not (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback):
                raise AssertionError(f"test tried to connect to a non-loopback address {address[0]}")

    def connect(self, address):
        check(address)
        return original(self, address)

    def connect_ex(self, address):
        check(address)
        return original_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)


class HelperUnderTest:
    def __init__(self, config: HelperConfig):
        self.helper = Helper(config)
        self.url = ""
        self._runner = None

    async def __aenter__(self):
        self._runner, bound = await start(self.helper, "127.0.0.1:0")
        self.url = f"http://{bound[0]}/"
        return self

    async def __aexit__(self, *exc):
        await self._runner.cleanup()

    async def post(self, body, raw: bytes | None = None, path: str = "/"):
        async with aiohttp.ClientSession() as session:
            data = raw if raw is not None else json.dumps(body).encode()
            async with session.post(self.url.rstrip("/") + path, data=data,
                                    headers={"Content-Type": "application/json"}) as resp:
                return resp.status, await resp.json(content_type=None), resp.headers


def config(dns_server, **overrides) -> HelperConfig:
    base = dict(listen="127.0.0.1:0", allow=["127.0.0.0/8"], resolver=dns_server.address, rate_per_minute=0,
                request_timeout=15.0)
    base.update(overrides)
    return HelperConfig(**base)


class SlowSite:
    """A loopback site whose every answer takes ``delay`` seconds."""

    def __init__(self, delay: float, host: str = "127.0.0.1", redirect_to: str | None = None):
        self.delay, self.host, self.redirect_to = delay, host, redirect_to
        self.hits = 0
        self.port = 0

    async def _handle(self, request):
        self.hits += 1
        await asyncio.sleep(self.delay)
        if self.redirect_to:
            return web.Response(status=302, headers={"Location": self.redirect_to})
        return web.Response(body=servers.PAGE, content_type="text/html")

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner, _ = await servers.serve_app(app, self.host, access_log=None, shutdown_timeout=0.1)
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc):
        await self._runner.cleanup()


# --- round trip ---------------------------------------------------------------------


async def test_round_trip_probe_control_helper_site(dns_server, http_server):
    dns_server.program("site.test", answer=["127.0.0.1"])
    url = f"http://site.test:{http_server.port}/"
    async with HelperUnderTest(config(dns_server)) as helper:
        async with aiohttp.ClientSession() as session:
            response, used, failure = await query_control(
                [helper.url], url, [f"127.0.0.1:{http_server.port}"], session=session, timeout=10)
    assert failure is None and used == helper.url
    assert response["dns"] == {"failure": None, "addrs": ["127.0.0.1"]}
    assert response["tcp_connect"] == {f"127.0.0.1:{http_server.port}": {"status": True, "failure": None}}
    assert response["tls_handshake"] == {}
    http = response["http_request"]
    assert http["status_code"] == 200 and http["failure"] is None
    assert http["title"] == servers.TITLE
    assert http["body_length"] == len(servers.PAGE)
    assert http["x_final_url"] == url
    assert re.fullmatch(r"[0-9a-f]{64}", http["x_body_sha256"])
    assert re.fullmatch(r"[0-9a-f]{16}", http["x_body_simhash"])
    assert http["x_body_truncated"] is False
    # allow-listed loopback is "public" for the operator: not flagged bogon
    assert response["ip_info"] == {"127.0.0.1": {"asn": 0, "flags": FLAG_RESOLVED_BY_PROBE | FLAG_RESOLVED_BY_TH}}
    assert http_server.hits.get("/") == 1


async def test_https_round_trip_validates_certificates(dns_server, https_server, pki):
    dns_server.program("localhost", answer=["127.0.0.1"])
    url = f"https://localhost:{https_server.port}/redirect"
    endpoint = f"127.0.0.1:{https_server.port}"
    async with HelperUnderTest(config(dns_server, ca_file=pki.ca_file)) as helper:
        status, response, _ = await helper.post({"http_request": url, "http_request_headers": {}, "tcp_connect": [endpoint]})
    assert status == 200
    tls = response["tls_handshake"][endpoint]
    assert tls["status"] is True and tls["failure"] is None and tls["server_name"] == "localhost"
    assert tls["x_cert_valid"] is True and tls["x_tls_version"].startswith("TLS")
    assert tls["x_cert_sha256"] and tls["x_cipher_suite"]
    assert response["http_request"]["status_code"] == 200
    assert response["http_request"]["x_final_url"] == f"https://localhost:{https_server.port}/"
    assert response["ip_info"]["127.0.0.1"]["flags"] == FLAG_RESOLVED_BY_PROBE | FLAG_RESOLVED_BY_TH | FLAG_VALID_FOR_DOMAIN


async def test_untrusted_certificate_is_reported_not_fetched_blindly(dns_server, unknown_ca_server, pki):
    dns_server.program("localhost", answer=["127.0.0.1"])
    url = f"https://localhost:{unknown_ca_server.port}/"
    async with HelperUnderTest(config(dns_server, ca_file=pki.ca_file)) as helper:
        status, response, _ = await helper.post({"http_request": url, "tcp_connect": []})
    tls = response["tls_handshake"][f"127.0.0.1:{unknown_ca_server.port}"]
    assert tls["status"] is False and tls["failure"] == "ssl_unknown_authority"
    assert tls["x_cert_valid"] is False and tls["x_cert_sha256"]
    assert response["http_request"]["failure"] == "ssl_unknown_authority"
    assert response["http_request"]["status_code"] == -1 and response["http_request"]["body_length"] == -1
    assert response["ip_info"]["127.0.0.1"]["flags"] == FLAG_RESOLVED_BY_TH


async def test_dns_failure_and_refused_endpoint(dns_server):
    port = servers.closed_port()
    async with HelperUnderTest(config(dns_server)) as helper:
        status, response, _ = await helper.post({"http_request": "http://missing.test/", "tcp_connect": [f"127.0.0.1:{port}"]})
    assert status == 200
    assert response["dns"] == {"failure": "dns_nxdomain_error", "addrs": []}
    assert response["tcp_connect"][f"127.0.0.1:{port}"] == {"status": False, "failure": "connection_refused"}
    assert response["http_request"]["failure"] == "dns_nxdomain_error"
    assert response["http_request"]["status_code"] == -1


def _spec_example(kind: str) -> dict:
    text = SPEC.read_text()
    section = text[text.index("### Example control request and response"):]
    blocks = re.findall(r"```JSON\n(.*?)```", section, re.DOTALL)
    return json.loads(blocks[0 if kind == "request" else 1])


def _shape(value):
    """Keys and JSON types, recursively; dicts keyed by endpoints/IPs are
    reduced to the shape of one value."""
    if isinstance(value, dict):
        keys = list(value)
        if keys and all(re.match(r"^[\[0-9a-f:.\]]+$", k) for k in keys):
            return {"<addr>": _shape(value[keys[0]])}
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


@pytest.mark.shared
async def test_request_and_response_shaped_like_the_spec_example(dns_server, pki):
    shared_path("data", "ooni-spec", "nettests", "ts-017-web-connectivity.md")
    request = _spec_example("request")
    expected = _spec_example("response")
    async with servers.WebServer(ssl_context=pki.server_context(pki.good)) as site:
        dns_server.program("localhost", answer=["127.0.0.1", "::1"])
        # The spec's example, with its public addresses swapped for loopback ones.
        request["http_request"] = f"https://localhost:{site.port}/"
        request["tcp_connect"] = [f"127.0.0.1:{site.port}"]
        async with HelperUnderTest(config(dns_server, ca_file=pki.ca_file, allow=["127.0.0.0/8", "::1/128"])) as helper:
            status, response, _ = await helper.post(request)
    assert status == 200
    ours, theirs = _shape(response), _shape(expected)
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for section in theirs:
        if isinstance(theirs[section], dict) and "<addr>" in theirs[section]:
            for key, kind in theirs[section]["<addr>"].items():
                for value in response[section].values():
                    # failures are null in the example and strings when something failed
                    allowed = {kind, "str", "NoneType"} if key == "failure" else {kind}
                    assert _shape(value[key]) in allowed, (section, key)
        elif isinstance(theirs[section], dict):
            for key, kind in theirs[section].items():
                assert _shape(response[section][key]) == kind or (kind == "dict" and isinstance(response[section][key], dict)) \
                    or isinstance(response[section][key], dict), (section, key)
        else:
            assert ours[section] == theirs[section], section
    assert response["http_request"]["status_code"] == 200
    assert response["http_request"]["discovered_h3_endpoint"] == ""
    assert response["quic_handshake"] == {} and response["http3_request"] is None
    assert sorted(response["dns"]["addrs"]) == ["127.0.0.1", "::1"]
    assert all(isinstance(v["asn"], int) and isinstance(v["flags"], int) for v in response["ip_info"].values())
    # the spec's flags 11 = probe | TH | valid-for-domain, the same bits as ours
    assert response["ip_info"]["127.0.0.1"]["flags"] == 11 == expected["ip_info"]["93.184.216.34"]["flags"]


# --- SSRF ---------------------------------------------------------------------------


@pytest.fixture
async def target():
    """The site a successful SSRF would reach: it must never see a request."""
    async with servers.WebServer() as site:
        yield site


@pytest.mark.parametrize("host", [
    "127.0.0.1", "[::1]", "10.0.0.1", "169.254.169.254", "0.0.0.0", "2130706433", "0177.0.0.1", "0x7f.1",
    "127.1", "[::ffff:127.0.0.1]", "loopback.test", "private.test", "metadata.test",
])
async def test_ssrf_targets_are_refused_and_never_fetched(dns_server, target, host):
    dns_server.program("loopback.test", answer=["127.0.0.1"])
    dns_server.program("private.test", answer=["10.1.2.3"])
    dns_server.program("metadata.test", answer=["169.254.169.254", "::ffff:127.0.0.1"])
    url = f"http://{host}:{target.port}/latest/meta-data"
    async with HelperUnderTest(config(dns_server, allow=["127.0.0.2/32"])) as helper:
        status, response, _ = await helper.post({"http_request": url, "tcp_connect": []})
    assert status == 200
    assert response["http_request"]["failure"] == "address_refused"
    assert response["http_request"]["status_code"] == -1
    for entry in response["tcp_connect"].values():
        assert entry == {"status": False, "failure": "address_refused"}
    assert all(info["flags"] & FLAG_BOGON for info in response["ip_info"].values())
    assert target.hits == {}


@pytest.mark.parametrize("host", ["\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127\u30020\u30020\u30021",
                                  "\uff11\uff12\uff17.0.0.1"])
async def test_full_width_loopback_is_refused_even_when_a_resolver_answers_it(dns_server, target, host):
    """Issue 10: the check ran before IDNA/NFKC, so ``１２７.０.０.１`` was a name;
    a resolver that rewrites NXDOMAIN answered it with an allowed address, the
    check passed, and the client (which normalises the host to 127.0.0.1)
    connected to loopback. The resolver here answers the normalised name."""
    dns_server.program("127.0.0.1", answer=["127.0.0.2"])
    for scheme in ("http", "https"):
        url = f"{scheme}://{host}:{target.port}/secret"
        async with HelperUnderTest(config(dns_server, allow=["127.0.0.2/32"])) as helper:
            status, response, _ = await helper.post({"http_request": url, "tcp_connect": []})
        assert status == 200
        assert response["http_request"]["failure"] == "address_refused", scheme
    assert target.hits == {}


async def test_probe_supplied_endpoints_are_checked(dns_server, pki):
    dns_server.program("localhost", answer=["127.0.0.2"])
    async with servers.RawServer("silent") as victim:
        endpoints = [f"127.0.0.1:{victim.port}", f"0177.0.0.1:{victim.port}", f"[::ffff:127.0.0.1]:{victim.port}",
                     "10.0.0.1:443", "[::1]:443", "169.254.169.254:80", "[fe80::1]:443"]
        async with HelperUnderTest(config(dns_server, allow=["127.0.0.2/32"])) as helper:
            status, response, _ = await helper.post({"http_request": f"https://localhost:{servers.closed_port()}/",
                                                     "tcp_connect": endpoints})
        assert status == 200
        for endpoint in endpoints:
            assert response["tcp_connect"][endpoint] == {"status": False, "failure": "address_refused"}, endpoint
        assert response["tls_handshake"]["10.0.0.1:443"]["failure"] == "address_refused"
        assert victim.connections == 0


@pytest.mark.parametrize("location", ["http://127.0.0.1:{port}/", "http://loopback.test:{port}/", "http://2130706433:{port}/",
                                      "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/"])
async def test_redirect_to_a_private_address_is_refused(dns_server, target, location):
    dns_server.program("loopback.test", answer=["127.0.0.1"])
    async with SlowSite(0.0, host="127.0.0.2", redirect_to=location.format(port=target.port)) as allowed:
        async with HelperUnderTest(config(dns_server, allow=["127.0.0.2/32"])) as helper:
            status, response, _ = await helper.post({"http_request": f"http://127.0.0.2:{allowed.port}/", "tcp_connect": []})
    assert allowed.hits == 1
    assert response["http_request"]["failure"] == "address_refused"
    assert response["tcp_connect"][f"127.0.0.2:{allowed.port}"]["status"] is True
    assert target.hits == {}


# --- HTTP behaviour -----------------------------------------------------------------


async def test_redirect_limits_and_body_cap(dns_server, http_server):
    dns_server.program("site.test", answer=["127.0.0.1"])
    base = f"http://site.test:{http_server.port}"
    async with HelperUnderTest(config(dns_server)) as helper:
        _, loop, _ = await helper.post({"http_request": f"{base}/loop", "tcp_connect": []})
        _, chain, _ = await helper.post({"http_request": f"{base}/chain/3", "tcp_connect": []})
        _, large, _ = await helper.post({"http_request": f"{base}/large", "tcp_connect": []})
        _, bad, _ = await helper.post({"http_request": f"{base}/bad-redirect", "tcp_connect": []})
    assert loop["http_request"]["failure"] == "http_too_many_redirects"
    assert http_server.hits["/loop"] == 11  # the first request and ten redirects
    assert chain["http_request"]["status_code"] == 200 and chain["http_request"]["x_final_url"] == f"{base}/"
    assert large["http_request"]["x_body_truncated"] is True
    assert large["http_request"]["body_length"] <= 512 * 1024
    assert bad["http_request"]["failure"] == "http_invalid_redirect"


async def test_throughput_extension(dns_server, http_server):
    dns_server.program("site.test", answer=["127.0.0.1"])
    async with HelperUnderTest(config(dns_server)) as helper:
        status, response, _ = await helper.post({
            "http_request": f"http://site.test:{http_server.port}/large", "tcp_connect": [],
            "x_throughput": {"seconds": 1, "max_bytes": 100_000},
        })
    assert status == 200
    [sample] = response["x_throughput"]
    assert sample["variant"] == "helper" and sample["failure"] is None and sample["ip"] == "127.0.0.1"
    assert 100_000 <= sample["bytes"] <= 100_000 + 65536
    assert sample["kbit_per_s"] > 0 and sample["seconds"] > 0
    assert sample["x_stopped"] == "max_bytes" and sample["x_samples_kbit"]


class TrickleSite(servers.StreamServer):
    """A loopback site that answers at once but sends its (large) body at
    about ``kbit`` kbit/s: a fetch of the helper's usual 512 KiB would take
    ~20 s at 200 kbit/s."""

    def __init__(self, kbit: float = 200, size: int = 4 * 1024 * 1024, chunk: int = 2500):
        self.size, self.chunk, self.interval = size, chunk, chunk * 8 / 1000 / kbit
        self.requests = 0
        self.port = 0

    async def _handle(self, reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1  # connect-only checks send no request
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n"
                         b"<html><head><title>Trickle</title></head><body>" % self.size)
            sent = 0
            while sent < self.size:
                writer.write(b"x" * self.chunk)
                sent += self.chunk
                await writer.drain()
                await asyncio.sleep(self.interval)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the helper hangs up at its time bound
        finally:
            writer.close()



async def test_throughput_on_a_slow_site_answers_in_bounded_time(dns_server):
    """The timed download runs alongside the usual work, and the answer comes
    within seconds + 6 s (probes/throttling.py HELPER_OVERHEAD) even though the
    site would need ~20 s for the usual 512 KiB fetch."""
    import time

    from probes.throttling import HELPER_OVERHEAD

    dns_server.program("slow.test", answer=["127.0.0.1"])
    async with TrickleSite(kbit=200) as site, HelperUnderTest(config(dns_server, request_timeout=30.0)) as helper:
        url = f"http://slow.test:{site.port}/video"
        started = time.monotonic()
        status, response, _ = await helper.post({"http_request": url, "tcp_connect": [f"127.0.0.1:{site.port}"],
                                                 "x_throughput": {"seconds": 1.5, "max_bytes": 2_000_000}})
        elapsed = time.monotonic() - started
    assert status == 200
    assert elapsed < 1.5 + HELPER_OVERHEAD and elapsed < 5.0, elapsed  # in practice ~2 s
    [sample] = response["x_throughput"]
    assert sample["failure"] is None and sample["ip"] == "127.0.0.1" and sample["x_status_code"] == 200
    assert sample["x_stopped"] == "deadline" and sample["seconds"] == 1.5
    assert 100 < sample["kbit_per_s"] < 400, sample  # ~200 kbit/s, measured like the probe's downloads
    assert len(sample["x_samples_kbit"]) >= 5 and all(x >= 0 for x in sample["x_samples_kbit"])
    assert sample["x_bin_seconds"] == 0.2 and sample["x_ttfb"] is not None
    # The usual work is still there; its body is read only up to 32 KiB.
    http = response["http_request"]
    assert http["failure"] is None and http["status_code"] == 200 and http["title"] == "Trickle"
    assert http["x_body_truncated"] is True and http["body_length"] <= 32 * 1024
    assert response["tcp_connect"][f"127.0.0.1:{site.port}"]["status"] is True
    assert site.requests == 2  # the fetch and the timed download


async def test_throughput_answer_is_bounded_when_the_site_never_answers(dns_server):
    import time

    from probes.throttling import HELPER_OVERHEAD

    dns_server.program("stuck.test", answer=["127.0.0.1"])
    async with SlowSite(delay=30.0) as site, HelperUnderTest(config(dns_server, request_timeout=30.0)) as helper:
        started = time.monotonic()
        status, response, _ = await helper.post({"http_request": f"http://stuck.test:{site.port}/", "tcp_connect": [],
                                                 "x_throughput": {"seconds": 0.5}})
        elapsed = time.monotonic() - started
    assert status == 200 and elapsed < 0.5 + HELPER_OVERHEAD + 0.5, elapsed
    [sample] = response["x_throughput"]
    assert sample["failure"] == "generic_timeout_error" and sample["bytes"] == 0 and sample["x_samples_kbit"] == []
    assert response["http_request"]["failure"] == "generic_timeout_error"


async def test_without_throughput_the_full_body_is_fetched(dns_server, http_server):
    dns_server.program("site.test", answer=["127.0.0.1"])
    async with HelperUnderTest(config(dns_server)) as helper:
        _, plain, _ = await helper.post({"http_request": f"http://site.test:{http_server.port}/large", "tcp_connect": []})
    assert "x_throughput" not in plain
    assert plain["http_request"]["body_length"] > 32 * 1024


def test_simhash_keeps_near_duplicates_close():
    page = b"<html><body>" + b" ".join(b"word%d" % i for i in range(300)) + b"</body></html>"
    nearly = page.replace(b"word150", b"changed")
    other = b"<html><body>Access to this site is blocked by order of the authority</body></html>"

    def distance(a, b):
        return bin(int(simhash(a), 16) ^ int(simhash(b), 16)).count("1")

    assert distance(page, nearly) < distance(page, other)
    assert distance(page, nearly) <= 8
    assert simhash(b"") == "0" * 16


# --- malformed input, limits, privacy ------------------------------------------------


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"tcp_connect": []}', "http_request"),
    (b'{"http_request": "http://a.test/"}', "tcp_connect"),
    (b'{"http_request": 42, "tcp_connect": []}', "URL"),
    (b'{"http_request": "ftp://a.test/", "tcp_connect": []}', "http"),
    (b'{"http_request": "http://a.test:99999/", "tcp_connect": []}', "URL"),
    (b'{"http_request": "http://a.test/", "tcp_connect": "1.2.3.4:80"}', "tcp_connect"),
    (b'{"http_request": "http://a.test/", "tcp_connect": [80]}', "tcp_connect"),
    (b'{"http_request": "http://a.test/", "tcp_connect": ["a.test:80"]}', "endpoint"),
    (b'{"http_request": "http://a.test/", "tcp_connect": ["1.2.3.4"]}', "endpoint"),
    (b'{"http_request": "http://a.test/", "tcp_connect": ["1.2.3.4:abc"]}', "endpoint"),
    (b"[" * 20000 + b"]" * 20000, "nested"),
    (b'{"http_request": "http://a.test/", "tcp_connect": [], "http_request_headers": []}', "headers"),
    (b'{"http_request": "http://a.test/", "tcp_connect": [], "http_request_headers": {"A": [1]}}', "headers"),
    (b'{"http_request": "http://a.test/", "tcp_connect": [], "x_throughput": {"seconds": 3600}}', "x_throughput"),
])
async def test_bad_requests_get_400(dns_server, raw, reason):
    async with HelperUnderTest(config(dns_server)) as helper:
        status, body, _ = await helper.post(None, raw=raw)
    assert status == 400
    assert reason.lower() in body["error"].lower()


async def test_oversized_body_gets_400(dns_server):
    big = json.dumps({"http_request": "http://a.test/", "tcp_connect": [], "pad": "x" * 70_000}).encode()
    async with HelperUnderTest(config(dns_server)) as helper:
        status, body, _ = await helper.post(None, raw=big)
        too_many = {"http_request": "http://a.test/", "tcp_connect": [f"192.0.2.1:{p}" for p in range(1, 40)]}
        status2, body2, _ = await helper.post(too_many)
    assert status == 400 and "larger than" in body["error"]
    assert status2 == 400 and "too many" in body2["error"]


async def test_overload_is_shed_with_503(dns_server):
    dns_server.program("slow.test", answer=["127.0.0.1"])
    async with SlowSite(1.0) as slow:
        async with HelperUnderTest(config(dns_server, max_inflight=2)) as helper:
            body = {"http_request": f"http://slow.test:{slow.port}/", "tcp_connect": []}
            results = await asyncio.gather(*(helper.post(body) for _ in range(6)))
            async with aiohttp.ClientSession() as session:
                async with session.get(helper.url + "health") as resp:
                    health = await resp.json()
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 2 and statuses.count(503) == 4
    shed = [r for r in results if r[0] == 503]
    assert all(r[2].get("Retry-After") and r[1]["error"] == "overloaded" for r in shed)
    assert health["status"] == "ok" and health["in_flight"] == 0 and health["version"]


async def test_rate_limit_per_client(dns_server):
    async with HelperUnderTest(config(dns_server, rate_per_minute=3)) as helper:
        statuses = [(await helper.post(None, raw=b"{}"))[0] for _ in range(4)]
        status, body, headers = await helper.post(None, raw=b"{}")
    assert statuses == [400, 400, 400, 429]
    assert status == 429 and int(headers["Retry-After"]) >= 1
    # The summary a minute counts refused requests too.
    assert "control requests in the last 60 s: 5 (400: 3, 429: 2)" in helper.helper.log_summary(60)
    # The bucket table holds keyed digests, never the address itself.
    buckets = helper.helper.limiter._buckets
    assert len(buckets) == 1 and all(b"127.0.0.1" not in key for key in buckets)


def test_rate_limiter_refills_and_prunes():
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.allow("192.0.2.1")[0] for _ in range(60))
    allowed, wait = limiter.allow("192.0.2.1")
    assert not allowed and 0 < wait <= 1.0
    now[0] += 1.0
    assert limiter.allow("192.0.2.1")[0]
    assert limiter.allow("192.0.2.2")[0]  # another client has its own bucket
    now[0] += 120
    limiter._prune(now[0])
    assert len(limiter) == 0


@pytest.mark.parametrize("access_log", [True, False])
async def test_logs_never_contain_client_addresses(dns_server, http_server, caplog, access_log):
    # The access log (--access-log) has a line per request; without it, the
    # periodic summary counts them. Neither names the client nor the URL.
    dns_server.program("site.test", answer=["127.0.0.1"])
    caplog.set_level(logging.DEBUG)
    async with HelperUnderTest(config(dns_server, access_log=access_log)) as helper:
        await helper.post({"http_request": f"http://site.test:{http_server.port}/", "tcp_connect": []})
        await helper.post(None, raw=b"nope")
        summary = helper.helper.log_summary(60)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith(("vantage", "aiohttp"))]
    per_request = [m for m in messages if m.startswith("control request status=")]
    assert len(per_request) == (2 if access_log else 0)
    assert summary is not None and summary in messages
    assert "control requests in the last 60 s: 2 (200: 1, 400: 1)" in summary
    assert not any("127.0.0.1" in m or "site.test" in m for m in messages)


def test_cli_serve_options_and_config(tmp_path):
    from cli.helper import helper as helper_group

    result = CliRunner().invoke(helper_group, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--listen", "--allow", "--max-inflight", "--rate-per-minute", "--resolver", "--ca-file", "--config"):
        assert option in result.output
    bad = tmp_path / "helper.toml"
    bad.write_text('listen = "127.0.0.1:0"\nbogus_key = 1\n')
    result = CliRunner().invoke(helper_group, ["serve", "--config", str(bad)])
    assert result.exit_code != 0 and "bogus_key" in str(result.exception)
    good = HelperConfig.from_mapping({"listen": "127.0.0.1:0", "allow": ["198.18.0.0/15"], "max-inflight": 7})
    assert good.max_inflight == 7 and good.allow == ["198.18.0.0/15"]


async def test_slow_request_body_does_not_hold_a_slot(dns_server, monkeypatch):
    from services.helper import limits

    monkeypatch.setattr(limits, "BODY_READ_SECONDS", 0.3)
    async with HelperUnderTest(config(dns_server, max_inflight=1)) as helper:
        host, port = helper.url[len("http://"):].rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 400") and b"in time" in head
        status, body, _ = await helper.post(None, raw=b"{}")
    assert status == 400 and "http_request" in body["error"]


async def test_response_flattens_into_control_rows(dns_server, https_server, pki):
    from probes.flatten import flatten

    dns_server.program("localhost", answer=["127.0.0.1"])
    async with HelperUnderTest(config(dns_server, ca_file=pki.ca_file)) as helper:
        _, response, _ = await helper.post({"http_request": f"https://localhost:{https_server.port}/",
                                            "tcp_connect": [], "x_throughput": {"seconds": 0.2}})
    record = {"measurement_id": "M1", "input": f"https://localhost:{https_server.port}/", "test_keys": {"control": response}}
    rows = flatten(record)
    [tls] = rows["tls_handshakes"]
    assert tls["side"] == "control" and tls["success"] is True and tls["cert_valid"] is True and tls["cert_sha256"]
    [http] = rows["http_transactions"]
    assert http["status_code"] == 200 and http["url"] == f"https://localhost:{https_server.port}/"
    assert rows["dns_answers"][0]["answer"] == "127.0.0.1"
    assert rows["throughput_samples"][0]["variant"] == "helper"


def test_rate_limit_keys_ipv6_clients_by_their_64_and_stays_bounded():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.allow("2001:db8:1:2::1")[0] and limiter.allow("2001:db8:1:2::99")[0]
    assert not limiter.allow("2001:db8:1:2:ffff::7")[0]  # same /64, third request
    assert limiter.allow("2001:db8:1:3::1")[0]  # another /64
    limiter.MAX_CLIENTS = 10
    for i in range(50):  # rotating clients faster than buckets refill
        limiter.allow(f"198.18.{i // 250}.{i % 250}")
    assert len(limiter._buckets) <= 11
