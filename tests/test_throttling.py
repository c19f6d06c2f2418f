"""Throttling: statistics on synthetic samples, the verdict rules, and the probe
against loopback TLS servers that pace their output by SNI (loopback only)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import ssl

import pytest

from analysis.throttling import (
    Download, _asymptotic_p, _exact_p, apply_throttling, judge, ks_2samp, ks_statistic, median,
)
from probes import throttling, timed_download
from probes.context import ProbeContext
from probes.records import Clock, Measurement

import servers

# --- statistics -----------------------------------------------------------------


def test_ks_extremes_exact():
    d, p, how = ks_2samp([1, 2, 3, 4], [5, 6, 7, 8])
    assert (d, how) == (1.0, "exact")
    assert p == pytest.approx(2 / 70)  # 2 of C(8,4) orderings are that extreme
    d, p, _ = ks_2samp([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert d == 0.0 and p == 1.0


def test_ks_ties_are_stepped_over():
    # All-zero bins on both sides must not count as a difference.
    assert ks_statistic([0, 0, 0, 5], [0, 0, 0, 5]) == 0.0
    assert ks_statistic([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(0.25)


def test_ks_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(7)
    for n, m, shift in ((12, 9, 0.8), (40, 8, 1.5), (30, 30, 0.3)):
        a = [rng.gauss(0, 1) for _ in range(n)]
        b = [rng.gauss(shift, 1) for _ in range(m)]
        ours = ks_2samp(a, b)
        ref = stats.ks_2samp(a, b, method="exact")
        assert ours[0] == pytest.approx(ref.statistic)
        assert ours[1] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)


def test_asymptotic_close_to_exact_for_large_samples():
    d = 0.12
    assert _asymptotic_p(d, 300, 400) == pytest.approx(_exact_p(d, 300, 400), abs=0.01)


def test_throughput_bins():
    # 1000 bytes every 100 ms for 1 s = 80 kbit/s in every 200 ms bin.
    arrivals = [(0.5 + 0.1 * i, 1000) for i in range(10)]
    bins = timed_download.throughput_bins(arrivals, 1.5, 0.2)
    assert len(bins) == 5 and all(b == pytest.approx(80.0) for b in bins)
    # A stall in the middle is an empty (0) bin, not a gap.
    stall = [(0.0, 1000), (0.1, 1000), (0.7, 1000), (0.9, 1000)]
    assert timed_download.throughput_bins(stall, 1.0, 0.2) == [80.0, 0.0, 0.0, 40.0, 40.0]
    # Shorter than one bin: one sample over its own duration.
    assert timed_download.throughput_bins([(0.0, 500), (0.05, 500)], 0.05, 0.2) == [160.0]
    assert timed_download.throughput_bins([], 1.0, 0.2) == []


# --- verdict rules on synthetic downloads ----------------------------------------------


def _dl(variant, attempt, kbit, *, spread=0.1, bins=10, rng=None, status=200, stopped="deadline", **kw):
    rng = rng or random.Random(attempt * 31 + len(variant))
    samples = [max(0.0, rng.gauss(kbit, kbit * spread)) for _ in range(bins)]
    return Download(variant=variant, attempt=attempt, kbit=median(samples), seconds=2.0, bytes=int(kbit * 250),
                    samples=samples, status=status, stopped=stopped, body_bytes=int(kbit * 240), **kw)


def _pair(target_kbit, scrambled_kbit, rounds=4, **kw):
    out = []
    for i in range(rounds):
        out += [_dl("target", i, target_kbit, **kw), _dl("scrambled", i, scrambled_kbit, **kw)]
    return out


def test_sni_throttled():
    v = judge(_pair(128, 2000), [_dl("helper", 0, 2500)])
    assert (v.status, v.method, v.layer) == ("throttled", "throttle.sni", "tls")
    assert v.evidence["ratio"] < 0.1 and v.evidence["ks"]["p"] < 1e-6
    assert v.evidence["rounds_slower"] == "4/4"


def test_http_url_names_http_layer():
    v = judge(_pair(128, 2000), [], scheme="http")
    assert (v.status, v.layer) == ("throttled", "http")


def test_three_times_slower_is_detected():
    v = judge(_pair(700, 2100), [])
    assert v.status == "throttled"


def test_slow_for_everyone_is_ok():
    v = judge(_pair(192, 192), [_dl("helper", 0, 190)], baseline_kbit=5000)
    assert v.status == "ok"
    assert v.evidence["rule"] == "no_slowdown"


def test_noisy_samples_are_inconclusive():
    rng = random.Random(3)
    downloads = []
    # Medians differ by ~2.5x, but the spread is huge and the rounds disagree.
    for i, (t, s) in enumerate([(300, 900), (1200, 1000), (250, 1100), (900, 700)]):
        downloads += [_dl("target", i, t, spread=1.2, bins=3, rng=rng), _dl("scrambled", i, s, spread=1.2, bins=3, rng=rng)]
    for d in downloads:  # make the per-download medians the planned values
        d.kbit = {0: (300, 900), 1: (1200, 1000), 2: (250, 1100), 3: (300, 700)}[d.attempt][d.variant == "scrambled"]
    v = judge(downloads, [])
    assert v.status == "inconclusive"
    assert v.evidence["rule"] == "slower_but_noisy"
    assert "rounds" in v.evidence["reason"] or "not significantly" in v.evidence["reason"]


def test_ip_throttled_needs_control_and_baseline():
    downloads = _pair(150, 160)
    helper = [_dl("helper", 0, 4000)]
    v = judge(downloads, helper, baseline_kbit=5000)
    assert (v.status, v.method, v.layer) == ("throttled", "throttle.ip", None)
    # Without a baseline the probe's own slow link cannot be ruled out.
    v = judge(downloads, helper, baseline_kbit=None)
    assert v.status == "ok" and "bottleneck" in v.evidence["note"]
    # Probe slow everywhere: its link, not this address.
    assert judge(downloads, helper, baseline_kbit=170).status == "ok"


def test_down_and_blocking_are_not_throttling():
    failed = [Download("target", i, failure="connection_refused") for i in range(2)]
    failed += [Download("scrambled", i, failure="connection_refused") for i in range(2)]
    assert judge(failed, [Download("helper", 0, failure="connection_refused")]).status == "down"
    assert judge(failed, [_dl("helper", 0, 3000)]).status == "inconclusive"
    reset = [Download("target", i, failure="connection_reset") for i in range(2)] + [
        _dl("scrambled", i, 2000) for i in range(2)]
    v = judge(reset, [])
    assert v.status == "inconclusive" and v.evidence["rule"] == "target_failed"


def test_scrambled_error_page_is_not_a_fast_control():
    downloads = []
    for i in range(4):
        downloads.append(_dl("target", i, 300))
        # The server picked another vhost: a small, fast 404.
        downloads.append(_dl("scrambled", i, 5000, status=404, stopped="eof"))
    v = judge(downloads, [])
    assert v.status == "ok" and v.evidence["scrambled"]["comparable"] == 0


def test_small_page_is_ok():
    downloads = [Download("target", i, kbit=20, seconds=0.05, samples=[20], status=200, stopped="eof") for i in range(4)]
    downloads += [Download("scrambled", i, kbit=200, seconds=0.01, samples=[200], status=200, stopped="eof") for i in range(4)]
    assert judge(downloads, []).evidence["rule"] == "too_small"


def test_private_address_is_inconclusive():
    assert judge(_pair(128, 2000), [], address_public=False).status == "inconclusive"


# --- database ------------------------------------------------------------------------


def _record(url, entries, control_entries=None, run_id="RUN1"):
    m = Measurement(test_name="throttling", test_version="0.1.0", input=url, run_id=run_id)
    keys = throttling.new_test_keys()
    keys["x_throughput"] = entries
    if control_entries is not None:
        keys["control"] = {"dns": {}, "tcp_connect": {}, "http_request": {}, "x_throughput": control_entries}
    m.test_keys = keys
    return m.to_dict()


def _entry(variant, attempt, kbit, ip="198.18.100.5"):
    samples = [kbit] * 10
    return {"side": "probe", "variant": variant, "attempt": attempt, "ip": ip, "server_name": "x", "failure": None,
            "bytes": int(kbit * 250), "seconds": 2.0, "kbit_per_s": kbit, "x_status_code": 200, "x_stopped": "deadline",
            "x_body_bytes": int(kbit * 240), "x_samples_kbit": [s * (1 + 0.01 * k) for k, s in enumerate(samples)]}


def test_apply_throttling_writes_verdicts():
    from analysis.db import ensure_schema
    from probes import store

    con = store.connect(":memory:")
    ensure_schema(con)  # the verdicts table is the analysis's
    throttled = [_entry(v, i, 128 if v == "target" else 2000) for i in range(4) for v in ("target", "scrambled")]
    normal = [_entry(v, i, 2000) for i in range(4) for v in ("target", "scrambled")]
    helper = [{"variant": "helper", "attempt": 0, "ip": "198.18.100.5", "failure": None, "bytes": 1, "seconds": 3.0,
               "kbit_per_s": 2100}]
    records = [
        (_record("https://social.example/", throttled, helper), None),
        (_record("https://video.example/", normal, helper), None),
        # A web measurement's verdict must be left alone.
    ]
    store.write_all(con, records)
    con.execute("INSERT INTO verdicts (measurement_id, input, status) VALUES ('WEB1', 'https://social.example/', 'ok')")
    assert apply_throttling(con, public_networks=["198.18.0.0/15"]) == 2
    rows = dict(con.execute("SELECT input, status || '/' || coalesce(method, '') FROM verdicts "
                            "WHERE measurement_id <> 'WEB1'").fetchall())
    assert rows == {"https://social.example/": "throttled/throttle.sni", "https://video.example/": "ok/"}
    evidence = json.loads(con.execute("SELECT evidence FROM verdicts WHERE input = 'https://social.example/' "
                                      "AND measurement_id <> 'WEB1'").fetchone()[0])
    assert evidence["ks"]["n"] == 40 and evidence["ratio"] < 0.1
    # Idempotent: a second pass replaces rather than duplicates.
    assert apply_throttling(con, public_networks=["198.18.0.0/15"]) == 2
    assert con.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 3
    # Without the lab's networks marked public, 198.18/15 is not a public address.
    apply_throttling(con)
    assert con.execute("SELECT count(*) FROM verdicts WHERE status = 'inconclusive'").fetchone()[0] == 2


# --- the probe against loopback servers ---------------------------------------------------

TARGET = "target.test"
BODY_SIZE = 4 * 1024 * 1024


class PacedServer:
    """HTTPS on 127.0.0.1 that serves TARGET's page only for ``Host: TARGET``
    and paces its output when the SNI matches ``slow_sni`` (None: fast for
    every name; "*": slow for every name)."""

    def __init__(self, ca, slow_sni: str | None, chunk: int = 2048, interval: float = 0.05):
        self.slow_sni = slow_sni
        self.chunk, self.interval = chunk, interval
        self.names: dict[int, str | None] = {}
        self.seen: list[tuple[str | None, str]] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(TARGET).configure_cert(self.context)
        self.context.sni_callback = self._sni

    def _sni(self, obj, name, _ctx):
        self.names[id(obj)] = name

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            host = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                         if line.lower().startswith(b"host:")), "")
            sni = self.names.get(id(writer.get_extra_info("ssl_object")))
            self.seen.append((sni, host))
            if host.split(":")[0] != TARGET:
                body = b"no such site"
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % BODY_SIZE)
            slow = self.slow_sni == "*" or (self.slow_sni is not None and sni == self.slow_sni)
            sent = 0
            while sent < BODY_SIZE:
                size = self.chunk if slow else 256 * 1024
                writer.write(b"x" * size)
                sent += size
                await writer.drain()
                if slow:
                    await asyncio.sleep(self.interval)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            pass  # the probe hangs up at its deadline or byte cap; stop() may cancel a paced writer
        finally:
            writer.close()

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def resolve_target(monkeypatch):
    """TARGET resolves to loopback; nothing else is resolved by these tests."""
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == TARGET:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


FAST_SETTINGS = throttling.Settings(rounds=3, download_seconds=1.0, max_bytes=1024 * 1024, bin_seconds=0.2)


async def _measure(ca, tmp_path, server):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ProbeContext(extra_ca_file=str(ca_file))
    keys = throttling.new_test_keys()
    await throttling.measure(f"https://{TARGET}:{server.port}/page", ctx, keys, Clock(), settings=FAST_SETTINGS)
    return keys


def _downloads(keys):
    from analysis.throttling import Download as D

    return [D(variant=e["variant"], attempt=e["attempt"], failure=e["failure"], kbit=e["kbit_per_s"],
              seconds=e["seconds"], bytes=e["bytes"], samples=e["x_samples_kbit"], status=e["x_status_code"],
              stopped=e["x_stopped"], body_bytes=e["x_body_bytes"], content_length=e["x_content_length"], ip=e["ip"])
            for e in keys["x_throughput"]]


async def test_probe_detects_sni_pacing(ca, tmp_path, resolve_target):
    server = await PacedServer(ca, slow_sni=TARGET).start()
    try:
        keys = await _measure(ca, tmp_path, server)
    finally:
        await server.stop()
    entries = keys["x_throughput"]
    assert [e["variant"] for e in entries] == ["target", "scrambled", "scrambled", "target", "target", "scrambled"]
    assert all(e["failure"] is None and e["x_status_code"] == 200 for e in entries), entries
    # The scrambled SNI is an unrelated name, while the real Host went inside TLS.
    scrambled_names = {e["server_name"] for e in entries if e["variant"] == "scrambled"}
    assert all(n.endswith(".example.net") and n != TARGET for n in scrambled_names)
    assert {(sni, host.split(":")[0]) for sni, host in server.seen} == (
        {(TARGET, TARGET)} | {(n, TARGET) for n in scrambled_names})
    target = [e for e in entries if e["variant"] == "target"]
    assert all(e["x_stopped"] == "deadline" and len(e["x_samples_kbit"]) >= 4 for e in target)
    assert all(e["x_stopped"] == "max_bytes" for e in entries if e["variant"] == "scrambled")
    assert keys["control_failure"] == "no_helper_configured"
    assert keys["x_probe_network_ok"] is True
    assert throttling.outcome_label(keys) == "target slower"
    verdict = judge(_downloads(keys), [])
    assert (verdict.status, verdict.method, verdict.layer) == ("throttled", "throttle.sni", "tls"), verdict.evidence


async def test_probe_slow_for_everyone_is_ok(ca, tmp_path, resolve_target):
    server = await PacedServer(ca, slow_sni="*").start()
    try:
        keys = await _measure(ca, tmp_path, server)
    finally:
        await server.stop()
    assert all(e["x_stopped"] == "deadline" for e in keys["x_throughput"])
    verdict = judge(_downloads(keys), [])
    assert verdict.status == "ok", verdict.evidence


async def test_probe_stops_early_on_a_dead_address(resolve_target):
    # Bind then close a port: connections to it are refused on loopback.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    keys = throttling.new_test_keys()
    await throttling.measure(f"https://{TARGET}:{port}/", ProbeContext(), keys, Clock(), settings=FAST_SETTINGS)
    assert [e["failure"] for e in keys["x_throughput"]] == ["connection_refused"] * 2
    assert throttling.outcome_label(keys) == "target download failed"


def test_request_and_names():
    request = timed_download.build_request("/a?b=1", "news.example")
    assert request.startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: news.example\r\n") and request.endswith(b"\r\n\r\n")
    names = {throttling.scrambled_name() for _ in range(20)}
    assert len(names) == 20 and all(n.endswith(".example.net") for n in names)


async def _helper_app(delay: float):
    """A loopback stand-in for the control helper (ts-017 shape + x_throughput)."""
    from aiohttp import web

    seen = []

    async def handle(request):
        seen.append(await request.json())
        await asyncio.sleep(delay)
        return web.json_response({
            "dns": {"failure": None, "addrs": ["127.0.0.1"]}, "tcp_connect": {}, "http_request": {"status_code": 200},
            "x_throughput": [{"variant": "helper", "attempt": 1, "ip": "127.0.0.1", "server_name": TARGET,
                              "bytes": 1000000, "seconds": 1.0, "kbit_per_s": 8000.0, "failure": None}],
        })

    app = web.Application()
    app.router.add_post("/", handle)
    runner, base = await servers.serve_app(app)
    return runner, base + "/", seen


async def _measure_with_helper(server, helper_url: str, ca_file, settings) -> tuple[dict, float]:
    """throttling.measure of ``server``'s page with one helper: (keys, seconds taken)."""
    import time

    import aiohttp

    async with aiohttp.ClientSession() as session:
        ctx = ProbeContext(extra_ca_file=str(ca_file), helpers=[helper_url], session=session)
        keys = throttling.new_test_keys()
        started = time.monotonic()
        await throttling.measure(f"https://{TARGET}:{server.port}/", ctx, keys, Clock(), settings=settings)
        return keys, time.monotonic() - started


@pytest.mark.parametrize("delay", [0.0, 4.0])
async def test_probe_asks_the_helper_and_bounds_the_wait(ca, tmp_path, resolve_target, delay):
    server = await PacedServer(ca, slow_sni=None).start()
    runner, url, seen = await _helper_app(delay)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = throttling.Settings(rounds=1, download_seconds=0.5, max_bytes=256 * 1024, helper_timeout=1.0,
                                   helper_grace=0.5)
    try:
        keys, elapsed = await _measure_with_helper(server, url, ca_file, settings)
    finally:
        await server.stop()
        await runner.cleanup()
    assert seen[0]["x_throughput"] == {"seconds": 3.0, "max_bytes": 256 * 1024}
    assert seen[0]["tcp_connect"] == [f"127.0.0.1:{server.port}"]
    if delay:
        assert keys["control_failure"] == "control_unreachable: generic_timeout_error" and elapsed < 3.5
    else:
        assert keys["control_failure"] is None
        assert keys["control"]["x_throughput"][0]["kbit_per_s"] == 8000.0


def test_default_control_timeout_leaves_room_for_the_helper():
    from services.helper import protocol, throughput

    # The helper's answer bound (setup + close) is what the probe budgets for.
    assert throttling.HELPER_OVERHEAD == throughput.SETUP_SECONDS + throughput.CLOSE_SECONDS
    assert throttling.DEFAULT.control_room() >= throttling.CONTROL_SLACK
    # Even the longest download a helper accepts fits the default timeout.
    assert throttling.Settings(helper_seconds=protocol.MAX_THROUGHPUT_SECONDS).control_room() >= 0


async def test_probe_gets_helper_samples_from_a_real_helper_on_a_slow_site(ca, tmp_path, resolve_target):
    """Probe -> the real control helper -> a site slow for everyone, all on
    loopback: the helper's timed download comes back with per-bin samples
    while the probe is still downloading, and flattens into control rows."""
    from probes.flatten import flatten
    from services.helper import Helper, HelperConfig, start

    server = await PacedServer(ca, slow_sni="*").start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = HelperConfig(listen="127.0.0.1:0", allow=["127.0.0.0/8"], rate_per_minute=0, ca_file=str(ca_file))
    runner, bound = await start(Helper(config), "127.0.0.1:0")
    settings = throttling.Settings(rounds=1, download_seconds=1.0, max_bytes=1024 * 1024, helper_seconds=1.0,
                                   helper_timeout=10.0, helper_grace=0.5)
    try:
        keys, elapsed = await _measure_with_helper(server, f"http://{bound[0]}/", ca_file, settings)
    finally:
        await server.stop()
        await runner.cleanup()
    assert keys["control_failure"] is None, keys["control_failure"]
    [sample] = keys["control"]["x_throughput"]
    assert sample["failure"] is None and sample["x_stopped"] == "deadline" and sample["kbit_per_s"] > 0
    assert len(sample["x_samples_kbit"]) >= 3
    assert elapsed < 1.0 + throttling.HELPER_OVERHEAD  # the control did not stretch the test
    rows = flatten({"measurement_id": "M1", "input": "x", "test_keys": keys})["throughput_samples"]
    control = [r for r in rows if r["side"] == "control"]
    assert len(control) == 1 and control[0]["variant"] == "helper" and control[0]["kbit_per_s"] > 0
