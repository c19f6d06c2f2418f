"""Privacy, live (issue 13): a measured server that echoes the client's
address, measured for real from another network namespace, then uploaded.

    client ns (the probe, 198.18.2.1) ── censor ns (a router) ── server ns

The server namespace holds a DNS server, a web server that tells every
client its address (a header, a cookie, the title, the body, a redirect's
Location, a binary body) and our helper (`vantage helper serve`), which gives
every URL its control. The probe runs `vantage run web` in the client
namespace, so what the server echoes is the probe's real address there;
`vantage upload` then sends its measurements to `vantage collector serve`.
The address must be nowhere: not in the probe's database (any table, any
column, the record JSON) nor beside it, not in what was uploaded, not in the
collector's database, spool or logs. The server's own log proves it saw, and
echoed, that address.

The recorded-echo tests (a record that already holds the address) stay in
tests/test_collector.py and tests/test_upload.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from labnet import CLIENT_ADDRESS, DNS_ADDRESS, SITE_ADDRESSES, LabNet
from rootonly import require_root
from test_collector import CollectorProcess

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
SITE, HELPER = SITE_ADDRESSES[0], SITE_ADDRESSES[1]
HELPER_URL = f"http://{HELPER}:8081/"
NAME = "echo.privacy.test"

# The measured server and its DNS, in the server namespace. It logs each
# client address it echoed (one per line) to the file in argv[1].
ECHO_SERVER = r"""
import asyncio, base64, sys
import dns.message, dns.rrset
from aiohttp import web

LOG, SITE, DNS, NAME = sys.argv[1:5]

def peer(request):
    address = request.transport.get_extra_info("peername")[0]
    with open(LOG, "a") as fh:
        fh.write(address + "\n")
    return address

async def page(request):
    ip = peer(request)
    body = (f"<html><head><title>You are {ip}</title></head><body>Hello {ip}, you connected from {ip}:"
            f"{request.transport.get_extra_info('peername')[1]}. <a href='http://{ip}/'>{ip}</a></body></html>")
    return web.Response(text=body, content_type="text/html",
                        headers={"X-Your-Address": ip, "X-Forwarded-For": f"{ip}, 10.0.0.1", "Set-Cookie": f"seen={ip}"})

async def redirect(request):
    ip = peer(request)
    raise web.HTTPFound(f"http://{NAME}/landing?from={ip}", headers={"X-Client": ip})

async def binary(request):
    ip = peer(request)
    blob = b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + ip.encode() + b"\x00\x01\xc0" + ip.encode() + bytes(range(256))
    return web.Response(body=blob, content_type="application/octet-stream", headers={"X-Seen": ip})

class DNSProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, addr):
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.rdtype == 1 and question.name.to_text().rstrip(".") == NAME:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", SITE))
        self.transport.sendto(response.to_wire(), addr)

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(DNSProtocol, local_addr=(DNS, 53))
    app = web.Application()
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/binary", binary)
    app.router.add_get("/{tail:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, SITE, 80).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "home" / "data"), XDG_CACHE_HOME=str(tmp_path / "home" / "cache"),
               PYTHONPATH=str(ROOT))
    for key in ("VANTAGE_DB", "VANTAGE_CONFIG", "VANTAGE_COLLECTOR_URL"):
        env.pop(key, None)
    return env


def _wait_for(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start")


def _dump(db: Path) -> str:
    """Every row of every table (the record JSON included), as text."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        parts = []
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
            parts.append(json.dumps(con.execute(f"SELECT * FROM {table}").fetchall(), default=str))
        return "\n".join(parts)
    finally:
        con.close()


def _files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else ([path] if path.is_file() else [])


def test_an_echoed_address_measured_live_is_nowhere_after_run_and_upload(tmp_path):
    require_root("ip")
    net = LabNet()
    resolv = Path("/etc/netns") / net.client
    procs: list[subprocess.Popen] = []
    collector = None
    env = _env(tmp_path)
    try:
        net.up()
        resolv.mkdir(parents=True, exist_ok=True)  # the probe's system resolver: the server namespace's DNS
        (resolv / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\n")
        echo_log = tmp_path / "echoed.log"
        echo = subprocess.Popen(["ip", "netns", "exec", net.server, sys.executable, "-c", ECHO_SERVER, str(echo_log),
                                 SITE, DNS_ADDRESS, NAME], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(echo)
        assert echo.stdout.readline().strip() == "ready", echo.stderr.read()
        helper_log = (tmp_path / "helper.log").open("w")
        helper = subprocess.Popen(["ip", "netns", "exec", net.server, sys.executable, "-m", "cli.main", "helper", "serve",
                                   "--listen", f"{HELPER}:8081", "--allow", "198.18.0.0/15", "--resolver", DNS_ADDRESS,
                                   "--rate-per-minute", "0"], cwd=ROOT, env=env, stdout=helper_log, stderr=helper_log)
        procs.append(helper)
        _wait_for(lambda: net.exec(net.client, sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                                   f"'{HELPER_URL}health', timeout=1)", check=False).returncode == 0, "the helper")

        # The probe measures from the client namespace: the server sees 198.18.2.1 and echoes it.
        db = tmp_path / "probe" / "probe.duckdb"
        urls = [f"http://{NAME}/", f"http://{NAME}/redirect", f"http://{NAME}/binary", f"http://{SITE}/direct"]
        run = subprocess.run(["ip", "netns", "exec", net.client, sys.executable, "-m", "cli.main", "run", "web",
                              *[a for u in urls for a in ("--url", u)], "--db", str(db), "--yes", "--json",
                              "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0", "--resolver", DNS_ADDRESS,
                              "--helper", HELPER_URL, "--public-network", "198.18.0.0/15"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)[0]["measured"] == len(urls)
        echoed = set(echo_log.read_text().split())
        assert CLIENT_ADDRESS in echoed, echoed  # the server saw the probe's real address and echoed it back

        con = duckdb.connect(str(db), read_only=True)
        try:
            assert con.execute("SELECT count(*) FROM measurements WHERE control_failure IS NULL").fetchone()[0] == len(urls)
            fetched = con.execute("SELECT headers, body FROM http_transactions WHERE side = 'probe' "
                                  "AND status_code = 200").fetchall()
        finally:
            con.close()
        assert fetched and any("[scrubbed]" in (row[0] or "") for row in fetched)  # echoed, then scrubbed
        probe_dump = _dump(db)
        assert CLIENT_ADDRESS not in probe_dump
        assert "[scrubbed]" in probe_dump
        for path in _files_under(db.parent):  # the database file, its WAL, lock, rescue, spool or last-run files
            assert CLIENT_ADDRESS.encode() not in path.read_bytes(), path

        # Upload to our collector; capture every byte it is sent on the way (its spool keeps the bodies).
        (tmp_path / "collector").mkdir()
        collector = CollectorProcess(tmp_path / "collector").start()
        upload = subprocess.run([sys.executable, "-m", "cli.main", "upload", "--db", str(db), "--collector",
                                 collector.url, "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert upload.returncode == 0, upload.stderr
        assert CLIENT_ADDRESS not in upload.stdout + upload.stderr
        spooled = b"".join(p.read_bytes() for p in _files_under(collector.spool))
        assert spooled, "the collector spooled nothing"
        assert CLIENT_ADDRESS.encode() not in spooled  # what was uploaded, as the collector received it
        assert collector.stop() == 0
        assert collector.rows("SELECT count(*) FROM measurements") == [(len(urls),)]
        assert CLIENT_ADDRESS not in _dump(collector.db)
        for path in [*_files_under(collector.root)]:  # database, spool, logs
            assert CLIENT_ADDRESS.encode() not in path.read_bytes(), path
    finally:
        if collector is not None:
            collector.cleanup()
        for proc in procs:
            proc.kill()
            proc.wait()
        net.down()
        shutil.rmtree(resolv, ignore_errors=True)
