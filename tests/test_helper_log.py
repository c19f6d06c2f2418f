"""The helper's log never blocks its event loop (services/helper/log.py), and
its simhash is the shingle-by-shingle vote it always was (services/helper/page.py)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.helper import log as helper_log
from services.helper import simhash

ROOT = Path(__file__).resolve().parent.parent


class _Stuck(io.TextIOBase):
    """A stream whose write never returns (until released): stderr as a pipe nobody reads."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        self.release.wait()
        return len(text)

    def flush(self):
        pass


@pytest.mark.timeout(60)
def test_a_stuck_stream_drops_records_instead_of_blocking():
    stuck = _Stuck()
    pipe = helper_log.LogPipe(stuck, capacity=100, level=logging.INFO).start()
    try:
        logger = logging.getLogger("vantage.helper.test")
        for i in range(5000):  # a handler that waited for the stream would hang here (pytest's timeout)
            logger.warning("line %d", i)
        # The writer thread holds one record, the queue 100; the rest are dropped, counted.
        assert 5000 - 101 <= pipe.dropped <= 5000 - 100
    finally:
        stuck.release.set()
        pipe.stop()
    assert stuck.writes >= 100  # what was queued is written once the stream moves again


def test_pipe_writes_formatted_records_and_restores_root():
    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    pipe = helper_log.LogPipe(out, level=logging.INFO).start()
    logging.getLogger("vantage.helper").info("served %d", 3)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("vantage.helper").exception("failed")
    pipe.stop()
    text = out.getvalue()
    assert re.search(r"INFO vantage.helper: served 3\n", text)
    assert "ERROR vantage.helper: failed" in text and "ValueError: boom" in text
    assert pipe.dropped == 0
    assert root.handlers == before


def test_request_stats_summary():
    stats = helper_log.RequestStats()
    assert stats.summary(60, 0, 0, 0) is None  # an idle minute says nothing
    for seconds in [0.1] * 8 + [0.5, 2.0]:
        stats.add(200, seconds)
    stats.add(503, 0.001)
    line = stats.summary(60, in_flight=3, shed=7, dropped=2)
    assert line == ("control requests in the last 60 s: 11 (200: 10, 503: 1); duration median 0.100s "
                    "p90 0.500s max 2.000s; in_flight=3 shed_total=7 log_lines_dropped=2")
    assert stats.count == 0 and stats.summary(60, 0, 0, 0) is None  # a new interval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_helper_with_an_unread_stderr_pipe_keeps_answering(tmp_path):
    """The bug: with stderr a pipe nobody reads, the helper logged each request
    from its event loop and stopped answering after ~650 of them."""
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "helper", "serve", "--listen", f"127.0.0.1:{port}", "--rate-per-minute",
         "0", "--access-log", "-v"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the helper did not start")
                time.sleep(0.2)
        # 2,000 requests of ~100 bytes of log line each: ~3x a pipe's 64 KiB.
        # A documentation address: refused by the target policy, answered at once.
        body = json.dumps({"http_request": "http://192.0.2.1/", "tcp_connect": []}).encode()
        for i in range(2000):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200
                assert json.loads(resp.read())["http_request"]["failure"] == "address_refused"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "ok"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the helper did not stop on SIGTERM with its stderr full")
        proc.stderr.close()


def _reference_simhash(body: bytes, shingle: int = 3) -> str:
    """The definition: each shingle's 64-bit BLAKE2b votes on every bit."""
    words = re.findall(r"\w+", body[:65536].decode("utf-8", "replace").lower())
    if not words:
        return "0" * 16
    grams = [" ".join(words[i:i + shingle]) for i in range(max(1, len(words) - shingle + 1))]
    weights = [0] * 64
    for gram in grams:
        value = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "big")
        for bit in range(64):
            weights[bit] += 1 if value >> bit & 1 else -1
    return f"{sum(1 << bit for bit in range(64) if weights[bit] > 0):016x}"


def test_simhash_matches_the_shingle_by_shingle_vote():
    rng = random.Random(13)
    vocab = ["lorem", "ipsum", "dolor", "été", "日本語", "x", "a1", "b_2", "zz"]
    cases = [b"", b"!!!", b"one", b"one two", b"one two three", b"a b a b", "é ü ß".encode(), b"\xff\xfe bad bytes",
             b"word " * 70000]  # past the 64 KiB looked at
    for _ in range(120):
        n = rng.choice([1, 2, 3, 4, 5, 10, 100, 2000])
        words = vocab[:rng.randint(1, len(vocab))]
        cases.append(" ".join(rng.choice(words) for _ in range(n)).encode())
    for _ in range(20):
        cases.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))))
    for body in cases:
        for shingle in (1, 2, 3, 4):
            assert simhash(body, shingle) == _reference_simhash(body, shingle), (body[:40], shingle)
