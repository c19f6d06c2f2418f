"""`vantage upload` (probes/upload.py), on loopback only.

- against our collector (a real process): everything pending is sent once,
  each acknowledgement recorded, bodies arrive whole, a second upload sends
  nothing;
- interoperability with a minimal bk-003 server of this test's own: the
  requests' shapes, retries of 503s and lost answers with jittered
  exponential backoff;
- offline: nothing lost, a bounded number of attempts, no tight loop;
- SOCKS5 with the proxy resolving the name (socks5h);
- privacy: the machine's address in a record is not in what was uploaded;
- the CLI: --pending, collector_url from the config, exit 3 while pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import struct

import pytest
from aiohttp import web
from click.testing import CliRunner

import analysis_fixtures as F
import servers
from probes import store
from probes import upload as U
from services.collector import protocol
from test_collector import CollectorProcess

NAME = re.compile(r"^[0-9A-Za-z_.+-]+$")


def local_db(path, count: int = 12, echo: str | None = None):
    con = store.connect(path)
    records = []
    for n in range(count):
        record, _ = F.one_page(f"s{n}.example", f"https://s{n}.example/", f"198.18.0.{n + 1}", f"page {n}", 800,
                               echo=echo, echo_words="you connected from", run_id="run-a" if n % 2 else "run-b",
                               started=1_750_000_000.0 + n)
        records.append(record)
    store.write_all(con, [(r, None) for r in records])
    return con, records


class MiniCollector:
    """The smallest bk-003 collector: open, submit, close; ids from the
    content like ours. ``fail`` answers 503 to that many submits after
    storing them (a lost answer); every request body is kept."""

    def __init__(self, fail: int = 0):
        self.fail = fail
        self.opened: list[dict] = []
        self.submits: list[tuple[str, dict]] = []
        self.closed: list[str] = []
        self.stored: dict[str, dict] = {}
        self.raw = bytearray()
        self.port = 0

    async def open(self, request):
        raw = await request.read()
        self.raw += raw
        body = json.loads(raw)
        self.opened.append(body)
        rid = f"20250101T000000Z_{body['probe_asn']}_{len(self.opened):050d}"
        return web.json_response({"backend_version": "1.0.0", "report_id": rid, "supported_formats": ["json"]})

    async def submit(self, request):
        raw = await request.read()
        self.raw += raw
        body = json.loads(raw)
        rid = request.match_info["rid"]
        self.submits.append((rid, body))
        if body.get("format") != "json" or body["content"].get("report_id") != rid:
            return web.json_response({"error": "bad"}, status=400)
        mid = hashlib.sha256(json.dumps({k: v for k, v in body["content"].items() if k != "report_id"},
                                        sort_keys=True).encode()).hexdigest()[:16]
        self.stored[mid] = body["content"]
        if self.fail:
            self.fail -= 1
            return web.json_response({"error": "try later"}, status=503, headers={"Retry-After": "0"})
        return web.json_response({"measurement_id": mid})

    async def close(self, request):
        self.closed.append(request.match_info["rid"])
        return web.json_response({"status": "success"})

    async def __aenter__(self):
        app = web.Application()
        app.router.add_post("/report", self.open)
        app.router.add_post("/report/{rid}", self.submit)
        app.router.add_post("/report/{rid}/close", self.close)
        self.runner, _ = await servers.serve_app(app)
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def no_sleep(sleeps: list):
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
    return sleep


async def test_upload_to_our_collector_once_and_whole(tmp_path):
    con, records = local_db(tmp_path / "probe.duckdb")
    (tmp_path / "c").mkdir()
    proc = CollectorProcess(tmp_path / "c").start()
    try:
        assert U.pending_count(con, proc.url) == 12
        summary = await U.upload(con, proc.url)
        assert (summary.uploaded, summary.pending, summary.refused, summary.offline) == (12, 0, 0, False)
        assert summary.reports == 2  # one per (run, test)
        acks = con.execute("SELECT measurement_id, collector, collector_measurement_id, report_id FROM uploads").fetchall()
        assert len(acks) == 12 and {a[1] for a in acks} == {proc.url}
        assert all(a[2].startswith("vc") and a[3] for a in acks)
        again = await U.upload(con, proc.url)
        assert (again.pending_before, again.uploaded, again.reports) == (0, 0, 0)
        # A lost local acknowledgement (a crash between the 200 and the insert): re-sent, stored once.
        con.execute("DELETE FROM uploads WHERE measurement_id = ?", [records[0]["measurement_id"]])
        resent = await U.upload(con, proc.url)
        assert resent.uploaded == 1
    finally:
        assert proc.stop() == 0
    central = proc.rows("SELECT m.measurement_id, m.input, t.body FROM measurements m JOIN http_transactions t "
                        "USING (measurement_id) WHERE t.side = 'probe' ORDER BY m.input")
    assert len(central) == 12
    assert {row[0] for row in central} == {a[2] for a in acks}
    bodies = {r["input"]: r["test_keys"]["requests"][0]["response"]["body"] for r in records}
    assert all(body == bodies[url] for _, url, body in central)
    # The x_ keys travel: the probe's own id and the control's answer.
    record = json.loads(proc.rows("SELECT record FROM measurements LIMIT 1")[0][0])
    assert record["x_measurement_id"] in {r["measurement_id"] for r in records}
    assert record["test_keys"]["x_probe_network_ok"] is True and record["test_keys"]["control"]


async def test_interoperates_with_a_minimal_bk003_collector_and_retries_lost_answers(tmp_path):
    con, records = local_db(tmp_path / "probe.duckdb", count=6)
    sleeps: list[float] = []
    async with MiniCollector(fail=2) as mini:
        summary = await U.upload(con, mini.url, backoff=U.Backoff(sleep=no_sleep(sleeps)), concurrency=1)
    assert (summary.uploaded, summary.pending) == (6, 0)
    for body in mini.opened:
        assert body["format"] == "json" and body["data_format_version"] == "0.2.0"
        assert protocol.PROBE_CC.match(body["probe_cc"]) and protocol.PROBE_ASN.match(body["probe_asn"])
        for key in ("software_name", "software_version", "test_name", "test_version"):
            assert NAME.match(body[key]), key
    assert len(mini.opened) == 2 and len(mini.closed) == 2
    for rid, body in mini.submits:
        content = body["content"]
        assert content["report_id"] == rid and content["probe_ip"] == "127.0.0.1"
        assert protocol.TIME.match(content["measurement_start_time"]) and isinstance(content["test_keys"], dict)
        protocol.check_content(content, rid)  # what our collector accepts
    # Two answers lost: 8 submits for 6 measurements, each stored once, each acknowledged once.
    assert len(mini.submits) == 8 and len(mini.stored) == 6
    assert con.execute("SELECT count(DISTINCT measurement_id), count(*) FROM uploads").fetchone() == (6, 6)
    assert len(sleeps) == 2 and all(0 <= s <= U.Backoff().cap for s in sleeps)


def test_backoff_is_exponential_with_full_jitter():
    b = U.Backoff(base=1.0, cap=30.0)
    for attempt in range(8):
        delays = [b.delay(attempt) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= min(30.0, 2 ** attempt)
        assert len(set(delays)) > 150  # jitter: not one synchronised retry time
    assert b.delay(0, retry_after=12) >= 12  # Retry-After is honoured


async def test_offline_nothing_lost_no_tight_loop(tmp_path):
    con, _ = local_db(tmp_path / "probe.duckdb", count=30)
    from test_collector import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    sleeps: list[float] = []
    summary = await U.upload(con, url, backoff=U.Backoff(sleep=no_sleep(sleeps)))
    assert summary.offline and summary.uploaded == 0 and summary.pending == 30
    assert "unreachable" in " ".join(summary.errors)
    # One request tried a few times, then the upload stopped: no retry storm across 30 measurements.
    assert len(sleeps) == U.Backoff().attempts - 1
    assert con.execute("SELECT count(*) FROM uploads").fetchone() == (0,)


class Socks5(servers.StreamServer):
    """A SOCKS5 proxy (no auth, CONNECT) that maps names itself: the
    collector's name is resolved here, never by the client."""

    def __init__(self, names: dict[str, str]):
        self.names = names
        self.targets: list[tuple[int, str, int]] = []  # (address type, host, port)

    async def _handle(self, reader, writer):
        try:
            version, n = await reader.readexactly(2)
            await reader.readexactly(n)
            writer.write(b"\x05\x00")
            _, cmd, _, atyp = await reader.readexactly(4)
            if atyp == 3:
                host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            elif atyp == 1:
                host = ".".join(map(str, await reader.readexactly(4)))
            else:
                host = (await reader.readexactly(16)).hex()
            port = struct.unpack("!H", await reader.readexactly(2))[0]
            self.targets.append((atyp, host, port))
            up_r, up_w = await asyncio.open_connection(self.names.get(host, host), port)
            writer.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()



async def test_upload_through_socks5_with_remote_name_resolution(tmp_path):
    con, _ = local_db(tmp_path / "probe.duckdb", count=3)
    async with MiniCollector() as mini, Socks5({"collector.invalid": "127.0.0.1"}) as proxy:
        url = f"http://collector.invalid:{mini.port}"
        summary = await U.upload(con, url, socks5=f"127.0.0.1:{proxy.port}")
    assert (summary.uploaded, summary.pending) == (3, 0)
    assert proxy.targets and all(t == (3, "collector.invalid", mini.port) for t in proxy.targets)


async def test_the_machines_address_is_not_in_what_is_uploaded(tmp_path, monkeypatch):
    address = "192.0.2.44"  # as if the runner had missed it: a measured server echoed it back
    monkeypatch.setattr(U, "local_addresses", lambda: [address])
    con, _ = local_db(tmp_path / "probe.duckdb", count=4, echo=address)
    async with MiniCollector() as mini:
        summary = await U.upload(con, mini.url)
    assert summary.uploaded == 4
    assert address.encode() not in mini.raw and b"[scrubbed]" in mini.raw


def test_cli_pending_config_and_exit_codes(tmp_path, monkeypatch):
    from cli.main import cli
    from test_collector import free_port

    db = tmp_path / "probe.duckdb"
    con, _ = local_db(db, count=5)
    con.close()
    monkeypatch.setenv("VANTAGE_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    runner = CliRunner()
    result = runner.invoke(cli, ["upload", "--db", str(db), "--pending"])
    assert result.exit_code != 0 and "collector_url" in str(result.exception or result.output)
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("VANTAGE_COLLECTOR_URL", url)
    result = runner.invoke(cli, ["upload", "--db", str(db), "--pending", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"collector": url, "pending": 5}
    # Issue 13: consent_upload gates only the scheduled upload; run by hand, uploading is an explicit act.
    monkeypatch.setenv("VANTAGE_CONSENT_UPLOAD", "false")
    result = runner.invoke(cli, ["upload", "--db", str(db)])  # offline: exit 3, nothing lost
    assert result.exit_code == 3, result.output
    assert "5 pending" in result.output and "could not be reached" in result.output
