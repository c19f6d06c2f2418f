"""The collector (services/collector/) as a real process on loopback.

- bk-003's documented exchanges (open, update, close) and the single call,
  status codes and body shapes;
- bad input: each a 4xx with a reason, the collector stays up, memory bounded;
- idempotency and capabilities: a measurement sent twice is stored once, a
  report id is needed to append, a closed report refuses more;
- faults: 20 clients upload while the collector is SIGKILLed twice; every
  acknowledged measurement is in the database exactly once; a kill during
  ingestion loses nothing;
- privacy: an address a client sent (probe_ip, echoed by a measured server
  in headers and body) is nowhere in the database, the spool or the logs;
- the central database is an ordinary Vantage database (analysis runs on it).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import duckdb
import pytest

import analysis_fixtures as F
from core.ooni_format import to_ooni
from services.collector import protocol

ROOT = Path(__file__).resolve().parents[1]
VANTAGE = [sys.executable, "-c", "from cli.main import main; main()"]

# bk-003 3.1 and 3.2, as documented (the report id is ours, the rest verbatim).
OPEN_EXAMPLE = {"data_format_version": "0.2.0", "format": "json", "probe_asn": "AS30722", "probe_cc": "IT",
                "software_name": "mkcollector", "software_version": "0.0.1", "test_name": "dummy",
                "test_version": "0.0.1"}
UPDATE_EXAMPLE = {
    "annotations": {}, "data_format_version": "0.2.0", "id": "bdd20d7a-bba5-40dd-a111-9863d7908572", "input": None,
    "input_hashes": [], "measurement_start_time": "2018-11-01 15:33:20", "options": [], "probe_asn": "AS0",
    "probe_cc": "ZZ", "probe_city": None, "probe_ip": "127.0.0.1", "report_id": None,
    "software_name": "mkcollector", "software_version": "0.0.1", "test_helpers": [],
    "test_keys": {"client_resolver": "91.80.37.104"}, "test_name": "dummy", "test_runtime": 5.0565230846405,
    "test_start_time": "2018-11-01 15:33:17", "test_version": "0.0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectorProcess:
    """`vantage collector serve` in a subprocess, restartable on the same
    ports, database and spool; its stderr goes to ``log``."""

    def __init__(self, root: Path, *extra: str):
        self.root = root
        self.db = root / "central.duckdb"
        self.spool = root / "spool"
        self.log = root / "collector.log"
        self.port, self.metrics_port = free_port(), free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> "CollectorProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                VANTAGE + ["collector", "serve", "--listen", f"127.0.0.1:{self.port}", "--db", str(self.db),
                           "--spool", str(self.spool), "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                           *self.extra],
                cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    with socket.create_connection(("127.0.0.1", self.metrics_port), timeout=0.2):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the collector did not start:\n" + self.log.read_text())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def cleanup(self) -> None:
        """Kill the collector and its ingest child if a failed check left them running."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            children = [int(c) for c in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            children = []
        self.kill()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def rss_peak_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def metric(self, name: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(self.metrics_url + "/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def rows(self, sql: str) -> list[tuple]:
        con = duckdb.connect(str(self.db), read_only=True)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    proc = CollectorProcess(tmp_path_factory.mktemp("collector")).start()
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


def measurement(client: int, n: int, echo: str | None = None) -> dict:
    """An OONI-envelope Vantage measurement (web_connectivity, one DNS answer,
    one connect, one request) unique to (client, n)."""
    record, body = F.one_page(f"site{n}.example", f"https://site{n}.example/c{client}",
                              f"198.18.{client % 250}.{n % 250 + 1}", f"client {client} page {n}", 600, echo=echo,
                              run_id=f"run-{client}", started=1_750_000_000.0 + n)
    content = to_ooni(record, [body])
    content.pop("run_id", None)
    content["report_id"] = None  # the report it is submitted in sets it
    return content


async def post(session: aiohttp.ClientSession, url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, json.loads(await r.read())


# --- bk-003's examples ---------------------------------------------------------------


async def test_ooni_documented_exchanges(collector):
    async with aiohttp.ClientSession() as s:
        status, opened = await post(s, collector.url + "/report", OPEN_EXAMPLE)
        assert status == 200
        assert set(opened) == {"backend_version", "report_id", "supported_formats"}
        assert protocol.NAME.match(opened["backend_version"]) and opened["supported_formats"] == ["json"]
        rid = opened["report_id"]
        assert rid.startswith(f"{time.gmtime().tm_year}") and "_AS30722_" in rid and len(rid.rsplit("_", 1)[1]) == 50

        content = dict(UPDATE_EXAMPLE, report_id=rid)
        status, answer = await post(s, f"{collector.url}/report/{rid}", {"content": content, "format": "json"})
        assert status == 200 and set(answer) == {"measurement_id"} and isinstance(answer["measurement_id"], str)

        status, closed = await post(s, f"{collector.url}/report/{rid}/close", b"")
        assert (status, closed) == (200, {"status": "success"})

        status, single = await post(s, collector.url + "/measurement", {"format": "json", "content": UPDATE_EXAMPLE})
        assert status == 200 and set(single) == {"measurement_id", "report_id"}
        # The same measurement, whichever way it came: the same id.
        assert single["measurement_id"] == answer["measurement_id"]

        # Legacy clients may send a wrong Content-Type (bk-003 1.0).
        async with s.post(collector.url + "/report", data=json.dumps(OPEN_EXAMPLE),
                          headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 200
        # bk-003 1.0: servers MUST support gzip request bodies.
        status, _ = await post(s, collector.url + "/report", gzip.compress(json.dumps(OPEN_EXAMPLE).encode()),
                               {"Content-Encoding": "gzip"})
        assert status == 200


# --- bad input ----------------------------------------------------------------------------


async def test_bad_input_is_a_4xx_with_a_reason_and_the_collector_stays_up(collector):
    async with aiohttp.ClientSession() as s:
        _, opened = await post(s, collector.url + "/report", OPEN_EXAMPLE)
        rid = opened["report_id"]
        good = {"format": "json", "content": dict(UPDATE_EXAMPLE, report_id=rid)}
        report = f"{collector.url}/report/{rid}"
        cases = [
            ("truncated JSON", collector.url + "/report", b'{"format": "json", "probe_cc": "I', {}, 400),
            ("not an object", collector.url + "/report", b"[1, 2]", {}, 400),
            ("cc lower case", collector.url + "/report", OPEN_EXAMPLE | {"probe_cc": "it"}, {}, 400),
            ("asn without AS", collector.url + "/report", OPEN_EXAMPLE | {"probe_asn": "30722"}, {}, 400),
            ("bad software name", collector.url + "/report", OPEN_EXAMPLE | {"software_name": "a b/c"}, {}, 400),
            ("number for a name", collector.url + "/report", OPEN_EXAMPLE | {"test_name": 7}, {}, 400),
            ("yaml", collector.url + "/report", OPEN_EXAMPLE | {"format": "yaml"}, {}, 400),
            ("missing field", collector.url + "/report", {k: v for k, v in OPEN_EXAMPLE.items() if k != "test_name"},
             {}, 400),
            ("test_keys a list", report, good | {"content": good["content"] | {"test_keys": []}}, {}, 400),
            ("start time format", report, good | {"content": good["content"] | {"measurement_start_time": "now"}}, {},
             400),
            ("runtime a string", report, good | {"content": good["content"] | {"test_runtime": "5"}}, {}, 400),
            ("content not an object", report, {"format": "json", "content": "{}"}, {}, 400),
            ("report_id mismatch", report, good | {"content": good["content"] | {"report_id": "other"}}, {}, 400),
            ("test_name not the report's", report, good | {"content": good["content"] | {"test_name": "other"}}, {},
             400),
            ("wrong report id", f"{collector.url}/report/{rid[:-1]}{'A' if rid[-1] != 'A' else 'B'}", good, {}, 404),
            ("made-up report id", f"{collector.url}/report/" + "A" * 300, good, {}, 404),
            ("non-UTF-8", collector.url + "/report", b'{"format": "json", "probe_cc": "\xff\xfe"}', {}, 400),
            ("lone surrogate", collector.url + "/report", b'{"format": "json", "probe_cc": "\\ud800"}', {}, 400),
            ("deep nesting", report, b'{"content": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400),
            ("oversized", report, b'{"content": "' + b"x" * (9 << 20) + b'"}', {}, 413),
            ("gzip bomb", report, gzip.compress(b" " * (64 << 20)), {"Content-Encoding": "gzip"}, 413),
            ("broken gzip", report, b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400),
            ("unsupported encoding", report, gzip.compress(b"{}"), {"Content-Encoding": "br"}, 415),
            ("a million tiny records", report + "/x_batch", b"{}\n" * 1_000_000, {}, 413),
            ("a bad line in a batch", report + "/x_batch",
             json.dumps(good["content"]).encode() + b"\n{\"test_name\": 1}\n", {}, 400),
        ]
        for name, url, body, headers, want in cases:
            status, answer = await post(s, url, body, headers)
            assert status == want, (name, status, answer)
            assert isinstance(answer.get("error"), str) and answer["error"], name
        async with s.get(collector.url + "/report") as r:  # the wrong method: a JSON refusal too
            assert r.status == 405 and "error" in json.loads(await r.read())

        # A closed report refuses more, and the capability is the only way in.
        assert (await post(s, report, good))[0] == 200
        assert (await post(s, report + "/close", b""))[0] == 200
        status, answer = await post(s, report, good)
        assert status == 409 and "closed" in answer["error"]
        assert (await post(s, report + "/x_batch", json.dumps(good["content"]).encode()))[0] == 409

        # Still up, and its memory bounded after a million records and a 64 MB bomb.
        async with s.get(collector.metrics_url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
    assert collector.rss_peak_kb() < 400_000, collector.rss_peak_kb()
    assert collector.metric("vantage_collector_in_flight") == 0


async def test_rate_limit_refuses_with_retry_after(tmp_path):
    proc = CollectorProcess(tmp_path, "--rate-per-minute", "5").start()
    try:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(8):
                async with s.post(proc.url + "/report", data=json.dumps(OPEN_EXAMPLE)) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert int(r.headers["Retry-After"]) >= 1 and "error" in json.loads(await r.read())
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3
    finally:
        assert proc.stop() == 0
    # The client's address (loopback here) appears in no log line but the one naming where we listen.
    assert [line for line in proc.log.read_text().splitlines() if "127.0.0.1" in line and "listening on" not in line] == []


# --- durability and idempotency ---------------------------------------------------------


async def _client(url: str, client: int, count: int, acked: dict, stop_after: float) -> None:
    """One uploader: open a report, submit ``count`` measurements one by one,
    retrying (jittered) whatever fails until acknowledged."""
    rng = random.Random(client)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        rid = None
        for n in range(count):
            content = measurement(client, n)
            while time.monotonic() < stop_after:
                try:
                    if rid is None:
                        status, opened = await post(s, url + "/report", OPEN_EXAMPLE | {"test_name": "web_connectivity"})
                        if status != 200:
                            raise OSError(status)
                        rid = opened["report_id"]
                    status, answer = await post(s, f"{url}/report/{rid}", {"format": "json",
                                                                          "content": content | {"report_id": rid}})
                    if status == 200:
                        previous = acked.setdefault(answer["measurement_id"], (client, n))
                        assert previous == (client, n)
                        break
                    assert status in (503,), (status, answer)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, json.JSONDecodeError):
                    pass
                await asyncio.sleep(rng.uniform(0.02, 0.15))


@pytest.fixture
def fresh_collector(tmp_path):
    """A CollectorProcess (not started) that is killed, with its ingest child, after the test."""
    proc = CollectorProcess(tmp_path)
    try:
        yield proc
    finally:
        proc.cleanup()


async def test_sigkill_twice_while_20_clients_upload_loses_no_acknowledged_measurement(fresh_collector):
    proc = fresh_collector.start()
    acked: dict[str, tuple[int, int]] = {}
    clients, per_client = 20, 20
    total = clients * per_client
    stop_after = time.monotonic() + 40
    tasks = [asyncio.create_task(_client(proc.url, c, per_client, acked, stop_after)) for c in range(clients)]
    kills = 0
    for threshold in (total // 4, total // 2):
        while len(acked) < threshold:
            await asyncio.sleep(0.01)
        proc.kill()  # mid-stream: requests in flight, a segment open, ingestion running
        kills += 1
        await asyncio.sleep(0.3)
        proc.start()
    await asyncio.gather(*tasks)
    assert len(acked) == total, f"only {len(acked)} of {total} acknowledged before the deadline"
    assert proc.stop() == 0
    stored = dict(proc.rows("SELECT measurement_id, count(*) FROM measurements GROUP BY 1"))
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged measurements missing"
    assert len(stored) == total and set(stored.values()) == {1}
    # No measurement's rows were written twice (ingestion re-ran after each kill).
    for table in ("tcp_connects", "http_transactions"):
        counts = proc.rows(f"SELECT count(*) FROM {table} WHERE side = 'probe' GROUP BY measurement_id")
        assert {c for (c,) in counts} == {1}, table
    assert not list(proc.spool.glob("seg-*")), "the spool was not ingested at SIGTERM"
    assert kills == 2


async def test_an_ingestor_that_dies_is_started_again(tmp_path):
    proc = CollectorProcess(tmp_path).start()
    try:
        import urllib.request

        health = json.loads(urllib.request.urlopen(proc.metrics_url + "/healthz", timeout=5).read())
        assert health["ingestor_up"] is True
        child = [int(c) for c in Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()]
        ingestors = [pid for pid in child if "vantage-ingest" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
                     or b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert ingestors
        for pid in ingestors:
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        async with aiohttp.ClientSession() as s:
            _, opened = await post(s, proc.url + "/report", OPEN_EXAMPLE | {"test_name": "web_connectivity"})
            rid = opened["report_id"]
            assert (await post(s, f"{proc.url}/report/{rid}", {"format": "json", "content": measurement(9, 1)}))[0] == 200
        deadline = time.monotonic() + 20
        while proc.metric("vantage_collector_ingested_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert proc.metric("vantage_collector_ingestor_up") == 1
        assert proc.metric("vantage_collector_ingested_total") == 1
    finally:
        assert proc.stop() == 0
    assert "starting it again" in proc.log.read_text()
    assert proc.rows("SELECT count(*) FROM measurements") == [(1,)]


def _spool_line(content: dict, public: str) -> bytes:
    mid = protocol.measurement_id(content)
    from probes.runner import scrub

    return json.dumps({"m": mid, "r": protocol.prepare(content, mid, public, None, scrub)}).encode() + b"\n"


async def test_a_kill_during_ingestion_loses_nothing(fresh_collector):
    proc = fresh_collector
    proc.spool.mkdir()
    # Ingested in batches of 2000 (three commits; the reader process has the next batch ready as one commits,
    # so there must be more than one commit after the first for the kill to land between them).
    total, per_segment = 6000, 250
    for seg in range(total // per_segment):
        lines = b"".join(_spool_line(measurement(1000 + seg, n), "20250101T000000Z_AS0_test")
                         for n in range(per_segment))
        (proc.spool / f"seg-{seg + 1:012d}.ready").write_bytes(lines)
    # A crash's torn tail: a line nobody was told was stored.
    (proc.spool / f"seg-{total // per_segment + 1:012d}.open").write_bytes(b'{"m": "vc0", "r": {"test_na')
    proc.start()
    deadline = time.monotonic() + 20
    while (done := proc.metric("vantage_collector_ingested_total")) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    proc.kill()
    assert 0 < done < total, done
    proc.start()
    assert proc.stop() == 0
    assert proc.rows("SELECT count(*), count(DISTINCT measurement_id) FROM measurements") == [(total, total)]
    counts = proc.rows("SELECT count(*) FROM http_transactions WHERE side = 'probe' GROUP BY measurement_id")
    assert {c for (c,) in counts} == {1}
    assert not list(proc.spool.glob("seg-*"))
    # Only the restarted collector stopped cleanly (the first was killed): its summary counts the one torn line.
    assert re.findall(r"(\d+) torn lines", proc.log.read_text()) == ["1"], proc.log.read_text()


@pytest.mark.parametrize("reader", [False, True], ids=["one-process", "reader-process"])
def test_only_a_segments_torn_last_line_is_skipped_others_go_to_rejected(tmp_path, reader):
    """An unreadable line that is not a segment's last was acknowledged: it is
    kept (raw, with the reason, in rejected.jsonl), not counted as torn; the
    same whether the ingestor reads itself or through its reader process."""
    import threading

    from services.collector.ingest import Ingestor, _SpoolDir

    spool = tmp_path / "spool"
    spool.mkdir()
    good = [_spool_line(measurement(7, n), "20250101T000000Z_AS0_test") for n in range(3)]
    (spool / "seg-000000000001.ready").write_bytes(
        good[0] + b'{"m": "vc1", "r": {"test_na\n' + b'{"m": "vc2"}\n' + b'[1, 2]\n' + good[1]
        + b'{"m": "vc3", "r": {"test_na')  # not JSON mid-segment, no "r", not an object; then a torn tail
    (spool / "seg-000000000002.ready").write_bytes(good[2] + b'{"m": "vc4"}')  # a last line that is JSON
    stop = threading.Event()
    stop.set()  # ingest what is ready, then return
    ingestor = Ingestor(tmp_path / "central.duckdb", _SpoolDir(spool), stop=stop, reader=reader, poll=0.1)
    try:
        if reader:
            ingestor._loop()
        else:
            ingestor.ingest(sorted(spool.glob("seg-*.ready")))
    finally:
        ingestor._close()
    assert (ingestor.ingested, ingestor.torn, ingestor.rejected, ingestor.errors) == (3, 1, 4, 0)
    assert not list(spool.glob("seg-*"))
    kept = [json.loads(line) for line in (spool / "rejected.jsonl").read_text().splitlines()]
    assert [k["raw"] for k in kept] == ['{"m": "vc1", "r": {"test_na', '{"m": "vc2"}', "[1, 2]", '{"m": "vc4"}']
    assert kept[0]["reason"].startswith("not JSON") and kept[1]["reason"].startswith("KeyError")
    assert kept[2]["reason"].startswith("TypeError") and kept[3]["reason"].startswith("KeyError")


def test_the_reader_process_batches_a_busy_database_and_a_reader_that_dies(tmp_path, monkeypatch):
    """Through the reader process: batches span segments, a batch the
    database refused for a while (busy) is committed later without being
    read again, and a reader that died is started again; every measurement
    is stored once and every segment deleted."""
    import threading

    from services.collector import ingest as ingest_module
    from services.collector.ingest import Ingestor, _SpoolDir, read_batches, _lines_at

    spool = tmp_path / "spool"
    spool.mkdir()
    lines = [_spool_line(measurement(9, n), "20250101T000000Z_AS0_test") for n in range(7)]
    for number, chunk in enumerate((lines[0:3], lines[3:5], lines[5:7]), 1):
        (spool / f"seg-{number:012d}.ready").write_bytes(b"".join(chunk))
    segments = sorted(spool.glob("seg-*.ready"))
    batches = list(read_batches(segments, 4))
    assert [len(b.ids) for b in batches] == [4, 3] and [len(b.finished) for b in batches] == [1, 2]
    # Where each line is, to read it again for rejected.jsonl when the database refuses it:
    again = _lines_at(batches[1].where, set(batches[1].ids))
    assert [again[mid] for mid in batches[1].ids] == lines[4:7]

    failures = {"left": 2}
    real = Ingestor._connection

    def busy(self):
        if failures["left"]:
            failures["left"] -= 1
            raise ingest_module.store.StoreError("the database is busy (held by an analyst)")
        return real(self)

    monkeypatch.setattr(Ingestor, "_connection", busy)
    monkeypatch.setattr(ingest_module, "_reader_main", _reader_once_then_die)  # the first reader dies
    stop = threading.Event()
    ingestor = Ingestor(tmp_path / "central.duckdb", _SpoolDir(spool), batch_size=4, stop=stop, reader=True, poll=0.1)
    thread = threading.Thread(target=ingestor._loop)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while ingestor.ingested < 7 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
        ingestor._close()
    assert (spool / "reader-died").exists()  # the first reader did die
    (spool / "reader-died").unlink()
    assert (ingestor.ingested, ingestor.duplicates, ingestor.rejected) == (7, 0, 0)
    assert ingestor.errors == 3 and "busy" in ingestor.last_error  # the reader's death, then twice busy
    assert not list(spool.glob("seg-*"))
    con = duckdb.connect(str(tmp_path / "central.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT measurement_id) FROM measurements").fetchone() == (7, 7)
    con.close()


def _reader_once_then_die(spool_dir, batch_size, out, parent):
    """A reader process that dies (SIGKILL, as the OOM killer would) the first
    time, and reads normally once started again (a marker file says which)."""
    from services.collector import ingest as ingest_module

    marker = Path(spool_dir) / "reader-died"
    if not marker.exists():
        marker.write_text("once")
        os.kill(os.getpid(), signal.SIGKILL)
    ingest_module._reader_main(spool_dir, batch_size, out, parent)


def test_the_spools_vectored_write_finishes_partial_writes(tmp_path, monkeypatch):
    """A group commit's lines go out in one writev (no joined copy); a write
    the kernel takes only in part is finished from where it stopped."""
    from services.collector import spool as spool_module

    pieces = [bytes([65 + n % 26]) * (1 + n * 37 % 500) + b"\n" for n in range(3000)]  # more than IOV_MAX
    real = os.writev
    calls = []

    def partial(fd, buffers):
        calls.append(len(buffers))
        first = bytes(buffers[0])
        return real(fd, [first[: max(1, len(first) // 2)]])  # half the first piece, nothing more

    path = tmp_path / "seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        spool_module._write_all(fd, pieces[:10] + [b""])
        monkeypatch.setattr(spool_module.os, "writev", partial)
        spool_module._write_all(fd, pieces[10:20])
        monkeypatch.setattr(spool_module.os, "writev", real)
        spool_module._write_all(fd, pieces[20:])
        spool_module._write_all(fd, b"bytes too\n")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces) + b"bytes too\n"
    assert len(calls) > 10 and max(calls) <= spool_module._IOV_MAX


def test_a_restarted_ingest_process_keeps_its_counters_and_publishes_its_error(tmp_path):
    from services.collector.ingest import IngestProcess

    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "seg-000000000001.ready").write_bytes(_spool_line(measurement(8, 1), "20250101T000000Z_AS0_test"))
    ingest = IngestProcess(tmp_path / "central.duckdb", spool)
    assert ingest.last_error is None and ingest.ingested == 0
    ingest.start()
    try:
        deadline = time.monotonic() + 30
        while ingest.ingested < 1:
            assert time.monotonic() < deadline and ingest.alive, "nothing ingested"
            time.sleep(0.05)
        os.kill(ingest.pid, signal.SIGKILL)  # as the OOM killer would
        while ingest.alive:
            time.sleep(0.01)
        assert ingest.ingested == 1
        ingest.start()
        assert ingest.last_error == "the ingestor process died (exit code -9)"
        (spool / "seg-000000000002.ready").write_bytes(_spool_line(measurement(8, 2), "20250101T000000Z_AS0_test"))
        while ingest.ingested < 2:
            assert time.monotonic() < deadline and ingest.alive, "the restarted ingestor ingested nothing"
            time.sleep(0.05)
        assert ingest.ingested == 2  # carried on, not reset to 1
    finally:
        ingest.stop()
    # The child's own error: a database it cannot open.
    (tmp_path / "not-a-db").mkdir()
    (spool / "seg-000000000003.ready").write_bytes(_spool_line(measurement(8, 3), "20250101T000000Z_AS0_test"))
    broken = IngestProcess(tmp_path / "not-a-db", spool)
    broken.start()
    try:
        deadline = time.monotonic() + 30
        while broken.last_error is None:
            assert time.monotonic() < deadline and broken.alive, "no error published"
            time.sleep(0.05)
        assert broken.errors >= 1 and broken.last_error.split(":")[0].endswith("Error"), broken.last_error
    finally:
        os.kill(broken.pid, signal.SIGKILL)
        broken._proc.join(10)


async def test_idempotent_and_no_upload_takes_anothers_place(tmp_path):
    proc = CollectorProcess(tmp_path).start()
    try:
        async with aiohttp.ClientSession() as s:
            opens = [await post(s, proc.url + "/report", OPEN_EXAMPLE | {"test_name": "web_connectivity"})
                     for _ in range(2)]
            (a, b) = (o[1]["report_id"] for o in opens)
            assert a != b
            mine = measurement(1, 1)
            first = await post(s, f"{proc.url}/report/{a}", {"format": "json", "content": mine})
            again = await post(s, f"{proc.url}/report/{a}", {"format": "json", "content": mine})
            elsewhere = await post(s, f"{proc.url}/report/{b}", {"format": "json", "content": mine | {"report_id": b}})
            assert first[0] == again[0] == elsewhere[0] == 200
            assert first[1] == again[1] == elsewhere[1]
            # Another client sending different content under the same client-side id gets another id.
            forged = mine | {"test_keys": mine["test_keys"] | {"requests": []}}
            other = await post(s, f"{proc.url}/report/{b}", {"format": "json", "content": forged | {"report_id": b}})
            assert other[0] == 200 and other[1]["measurement_id"] != first[1]["measurement_id"]
            # A batch of ours: in order, durable, the same ids as one by one.
            contents = [measurement(2, n) for n in range(50)]
            batch = b"\n".join(json.dumps(c).encode() for c in contents)
            status, answer = await post(s, f"{proc.url}/report/{a}/x_batch", batch)
            assert status == 200 and len(answer["measurement_ids"]) == 50
            assert answer["measurement_ids"] == [protocol.measurement_id(c) for c in contents]
    finally:
        assert proc.stop() == 0
    rows = proc.rows("SELECT measurement_id, run_id, input FROM measurements")
    assert len(rows) == 52
    runs = {r[1] for r in rows}
    # Stored under the reports' public names: the capabilities themselves are not in the database.
    assert a not in runs and b not in runs and protocol.public_report_id(a) in runs
    text = (proc.spool / "reports.jsonl").read_text()
    assert a not in text and b not in text


# --- privacy ---------------------------------------------------------------------------------


async def test_the_probes_address_is_nowhere_in_db_spool_or_logs(tmp_path):
    address = "203.0.113.77"  # what a measured server echoed, and what an OONI client sent as probe_ip
    proc = CollectorProcess(tmp_path).start()
    try:
        async with aiohttp.ClientSession() as s:
            _, opened = await post(s, proc.url + "/report", OPEN_EXAMPLE | {"test_name": "web_connectivity",
                                                                             "probe_ip": address})
            rid = opened["report_id"]
            for n in range(5):
                content = measurement(7, n, echo=address) | {"probe_ip": address, "report_id": rid}
                content["test_keys"]["x_note"] = f"connected from {address}:51234"
                status, _ = await post(s, f"{proc.url}/report/{rid}", {"format": "json", "content": content})
                assert status == 200
            # bad requests carrying it are not logged with it either
            await post(s, f"{proc.url}/report/{rid}", {"format": "json", "content": {"probe_ip": address}})
            await post(s, proc.url + "/report", b"\xff" + address.encode())
            time.sleep(1.5)  # a segment rotates and is ingested while running
            spooled = b"".join(p.read_bytes() for p in proc.spool.iterdir() if p.is_file())
            assert address.encode() not in spooled
    finally:
        assert proc.stop() == 0
    assert proc.rows("SELECT count(*) FROM measurements") == [(5,)]
    for path in [proc.db, *proc.spool.iterdir(), proc.log]:
        if path.is_file():
            assert address.encode() not in path.read_bytes(), path
    con = duckdb.connect(str(proc.db), read_only=True)
    try:
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
            dump = json.dumps(con.execute(f"SELECT * FROM {table}").fetchall(), default=str)
            assert address not in dump, table
        headers = con.execute("SELECT headers, body FROM http_transactions WHERE side = 'probe' LIMIT 1").fetchone()
        assert "[scrubbed]" in headers[0] and "[scrubbed]" in headers[1]
    finally:
        con.close()


# --- an ordinary Vantage database ------------------------------------------------------------


async def test_the_central_database_is_analysed_unchanged(collector, tmp_path):
    from analysis.engine import analyze

    proc = CollectorProcess(tmp_path).start()
    async with aiohttp.ClientSession() as s:
        _, opened = await post(s, proc.url + "/report", OPEN_EXAMPLE | {"test_name": "web_connectivity"})
        rid = opened["report_id"]
        batch = b"\n".join(json.dumps(measurement(3, n)).encode() for n in range(10))
        assert (await post(s, f"{proc.url}/report/{rid}/x_batch", batch))[0] == 200
    assert proc.stop() == 0
    con = duckdb.connect(str(proc.db))
    try:
        analyze(con, fingerprints_dir="/nonexistent", public_networks=["198.18.0.0/15"])
        statuses = con.execute("SELECT status, count(*) FROM verdicts GROUP BY 1").fetchall()
    finally:
        con.close()
    assert statuses == [("ok", 10)]
