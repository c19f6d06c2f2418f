"""The report in a real browser: headless Chromium (Debian's `chromium`)
opens index.html from disk, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no port, no websocket). Each page load must
log no console error, make no request besides the file itself, and run no
script; screenshots (desktop and phone) go to the test's tmp folder.

Without chromium these tests skip, except under CI=true, where they fail
(scripts/setup.sh --test installs it as root).
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from test_report import START, blockpage, fingerprints, make_database, nxdomain, ok_site

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                  "--disable-extensions", "--mute-audio", "--hide-scrollbars"]
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
DESKTOP = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: under CI=true the browser tests may not skip (scripts/setup.sh --test installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe


class Browser:
    """A minimal DevTools-protocol client over Chromium's debugging pipe
    (fd 3: commands in, fd 4: replies and events out, NUL-terminated JSON)."""

    def __init__(self, exe: str, profile: Path, log: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # Chromium's ends are moved above fd 9 first, so that they never are 3 or 4 themselves.
        cmd_r, out_w = (self._high(fd) for fd in (cmd_r, out_w))
        argv = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        # bash (dash takes no fd above 9) puts the pipe ends on fds 3 and 4, where Chromium expects them.
        script = f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self._log = log.open("wb")
        self.proc = subprocess.Popen(["bash", "-c", script, "bash", *argv], pass_fds=(cmd_r, out_w),
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        os.close(cmd_r)
        os.close(out_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        self.dialogs: list[dict] = []

    @staticmethod
    def _high(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited ({self.proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        if message.get("method") == "Page.javascriptDialogOpening":
            # A script ran (alert/confirm/prompt): note it and dismiss it so the page goes on.
            self.dialogs.append(message["params"])
            self._send("Page.handleJavaScriptDialog", {"accept": False}, message.get("sessionId"))
        return message

    def _send(self, method: str, params: dict | None, session: str | None) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        return self._id

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event["method"] == method:
                return self.events.pop(i)
        while True:
            message = self._read(deadline)
            if message.get("method") == method:
                return message
            if "method" in message:
                self.events.append(message)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                message = self._read(deadline)
                if "method" in message:
                    self.events.append(message)
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        self._log.close()


def open_page(html: Path, work: Path, viewport: dict, name: str) -> dict:
    """Load ``html`` in a fresh Chromium profile; returns what happened:
    requests, console errors, dialogs, a few DOM facts, and the screenshot path."""
    work.mkdir(parents=True, exist_ok=True)
    browser = Browser(chromium(), work / f"profile-{name}", work / f"chromium-{name}.log")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", viewport, session=session)
        url = html.resolve().as_uri()
        browser.call("Page.navigate", {"url": url}, session=session)
        browser.wait("Page.loadEventFired")
        browser.drain(1.0)
        facts = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": """({
            text: document.body.innerText,
            scripts: document.scripts.length,
            active: document.querySelectorAll('img, iframe, object, embed, script, link, a[href^="javascript" i]').length,
            links: Array.from(document.links).map(a => a.href),
            overflow: document.documentElement.scrollWidth - window.innerWidth,
            svgs: document.querySelectorAll('svg').length,
            pwned: typeof window.__pwned !== 'undefined'})"""}, session=session)["result"]["value"]
        metrics = browser.call("Page.getLayoutMetrics", session=session)
        height = min(int(metrics["cssContentSize"]["height"]), 12000)
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                       "clip": {"x": 0, "y": 0, "width": viewport["width"],
                                                                "height": height, "scale": 1}}, session=session)
        png = work / f"{name}.png"
        png.write_bytes(base64.b64decode(shot["data"]))
        pdf = browser.call("Page.printToPDF", {"printBackground": False}, session=session, timeout=60)
        (work / f"{name}.pdf").write_bytes(base64.b64decode(pdf["data"]))
        browser.drain(0.3)
    finally:
        browser.close()
    events = browser.events
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    errors = [e["params"] for e in events
              if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert", "warning"))
              or e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning"))]
    return {"url": url, "requests": requests, "errors": errors, "dialogs": browser.dialogs, "facts": facts,
            "png": png, "pdf": work / f"{name}.pdf"}


def build_report(db: Path, out: Path, country: str) -> Path:
    from analysis.db import connect
    from analysis.report import build

    con = connect(db)
    try:
        build(con, country=country, out_dir=out, generated_at=dt.datetime(2025, 3, 11, tzinfo=dt.timezone.utc))
    finally:
        con.close()
    return out / "index.html"


@pytest.fixture(scope="module")
def clean_report(tmp_path_factory) -> Path:
    chromium()
    folder = tmp_path_factory.mktemp("browser-db")
    make_database(folder / "v.duckdb", fingerprints(folder / "fp"))
    return build_report(folder / "v.duckdb", folder / "report", "ZZ")


def assert_quiet(result: dict) -> None:
    assert result["requests"] == [result["url"]], f"requests besides the page itself: {result['requests']}"
    assert result["errors"] == [], result["errors"]
    assert result["dialogs"] == []
    assert result["facts"]["scripts"] == 0 and result["facts"]["pwned"] is False
    png = result["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert result["pdf"].read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("viewport_name", ["desktop", "phone"])
def test_report_opens_offline_without_errors_or_requests(clean_report, tmp_path, viewport_name):
    viewport = DESKTOP if viewport_name == "desktop" else PHONE
    result = open_page(clean_report, tmp_path, viewport, viewport_name)
    assert_quiet(result)
    facts = result["facts"]
    assert facts["svgs"] == 3
    assert "14 of 20 usable measurements of this URL on AS64500" in facts["text"]
    # On a phone the page does not scroll sideways: wide tables scroll inside their own box.
    assert facts["overflow"] <= 1, facts["overflow"]
    assert all(link.startswith(("https://", "http://", "file://")) for link in facts["links"])


HOSTILE_TITLE = "<script>alert(1)</script>"
HOSTILE_HEADER = '"><img src=x onerror=alert(2)>'
HOSTILE_URL = "javascript:alert(3)//evil.example/"
HOSTILE_ASN = 'AS1"><svg onload=alert(4)>'
HOSTILE_FP = "<b onmouseover=alert(5)>fp</b>"
HOSTILE_CATEGORY = "<iframe src=javascript:alert(6)>"


def test_hostile_strings_render_as_text_and_run_nothing(tmp_path):
    chromium()
    import duckdb

    fp_dir = tmp_path / "fp"
    fp_dir.mkdir()
    (fp_dir / "blockpage_signatures.json").write_text(json.dumps({"fingerprint": HOSTILE_FP, "pattern": "restricted by decision"}) + "\n")
    (fp_dir / "false_positive_signatures.json").write_text('{"fingerprint": "fp_nginx", "pattern": "Welcome to nginx"}\n')
    body = f"<html><head><title>{HOSTILE_TITLE}</title></head><body>Access restricted by decision of the regulator.</body></html>"
    records = []
    for i in range(6):
        for k in range(4):
            kw = dict(run_id=f"vp{k % 2}", started=START + i * 86400 + 3600 * (k + 1), cc="ZZ", asn=HOSTILE_ASN)
            if k == 0:
                records.append((blockpage("evil.example", body=body, headers={"Server": HOSTILE_HEADER, "Content-Type": "text/html"}, **kw), HOSTILE_CATEGORY))
            elif k == 1:
                records.append((nxdomain("news.example", **kw), "NEWS"))
            else:
                records.append((ok_site(f"ok{k}.example", **kw), "COMM"))
    db = tmp_path / "v.duckdb"
    make_database(db, fp_dir, records)
    con = duckdb.connect(str(db))
    con.execute("UPDATE measurements SET input = ? WHERE domain = 'evil.example'", [HOSTILE_URL])
    con.close()
    html_path = build_report(db, tmp_path / "report", "ZZ")
    html = html_path.read_text(encoding="utf-8")
    # Jinja's autoescaping: every hostile string is in the page only as escaped text.
    for hostile in (HOSTILE_TITLE, HOSTILE_HEADER, HOSTILE_ASN, HOSTILE_FP, HOSTILE_CATEGORY):
        assert hostile not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'href="javascript' not in html.lower()
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    for hostile in (HOSTILE_TITLE, HOSTILE_HEADER, HOSTILE_FP, HOSTILE_CATEGORY):
        assert hostile not in md
    assert "&lt;script&gt;alert\\(1\\)" in md or "&lt;script&gt;alert(1)&lt;/script&gt;" in md

    for viewport, name in ((DESKTOP, "hostile-desktop"), (PHONE, "hostile-phone")):
        result = open_page(html_path, tmp_path, viewport, name)
        assert_quiet(result)
        facts = result["facts"]
        assert facts["active"] == 0  # no img, iframe, script, link or javascript: link came out of the data
        for hostile in (HOSTILE_TITLE, HOSTILE_HEADER, HOSTILE_URL, HOSTILE_FP, HOSTILE_CATEGORY):
            assert hostile in facts["text"], hostile  # shown, as text
        assert not any(link.lower().startswith("javascript") for link in facts["links"])
