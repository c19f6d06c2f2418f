"""probes.geo: lookups in the real OONI probe-assets databases, download from a
loopback server, and probe location discovery. No traffic leaves 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from click.testing import CliRunner

from probes import geo
from probes.geo import GeoDB, GeoError, discover_probe_location
from cli.geo import geo as geo_group
from shared import SHARED, shared_path

IPDB = SHARED / "data" / "ipdb"


def need_ipdb() -> Path:
    shared_path("data", "ipdb", "asn.mmdb.gz")
    return shared_path("data", "ipdb", "country.mmdb.gz").parent


@pytest.fixture(scope="module")
def real_db_dir(tmp_path_factory) -> Path:
    src = need_ipdb()
    out = tmp_path_factory.mktemp("geo")
    for kind in ("asn", "country"):
        with gzip.open(src / f"{kind}.mmdb.gz") as fin, open(out / f"{kind}.mmdb", "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return out


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("VANTAGE_GEO_URL", raising=False)
    monkeypatch.delenv("VANTAGE_GEO_DB", raising=False)
    monkeypatch.delenv("VANTAGE_CONFIG", raising=False)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- lookups (file reads only)


@pytest.mark.shared
def test_lookup_well_known_addresses(real_db_dir):
    with GeoDB(real_db_dir) as db:
        assert db.lookup("8.8.8.8") == ("US", "AS15169", "Google LLC")
        cc, asn, name = db.lookup("1.1.1.1")
        assert asn == "AS13335" and name.startswith("Cloudflare") and len(cc) == 2
        assert db.lookup("2001:4860:4860::8888")[1] == "AS15169"
        assert db.lookup("10.1.2.3") == ("ZZ", "AS0", None)
        assert db.lookup("127.0.0.1") == ("ZZ", "AS0", None)
        assert db.lookup("not-an-ip") == ("ZZ", "AS0", None)
        meta = db.metadata()
        assert "ASN" in meta["asn"]["type"] and "Country" in meta["country"]["type"]


def test_missing_or_broken_database(tmp_path):
    with pytest.raises(GeoError, match=r"run `vantage geo update` first"):
        GeoDB(tmp_path)
    (tmp_path / "asn.mmdb").write_bytes(b"not a database")
    (tmp_path / "country.mmdb").write_bytes(b"not a database")
    with pytest.raises(GeoError, match="not a usable MaxMind database") as info:
        GeoDB(tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- download (loopback)


@pytest.fixture
async def geo_server(monkeypatch, serve_app):
    files: dict[str, bytes] = {}
    if (IPDB / "asn.mmdb.gz").is_file():
        for name in ("asn.mmdb.gz", "country.mmdb.gz"):
            files[name] = (IPDB / name).read_bytes()

    async def handler(request):
        name = request.match_info["name"]
        if name == "ip":
            return web.Response(text="8.8.8.8\n")
        if name not in files:
            return web.Response(status=404)
        return web.Response(body=files[name], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/dl/{name}", handler)
    base = await serve_app(app) + "/dl/"
    monkeypatch.setenv("VANTAGE_GEO_URL", base)
    yield SimpleNamespace(files=files, base=base)


@pytest.mark.shared
async def test_download_installs_both_databases(geo_server, tmp_path):
    need_ipdb()
    dest = tmp_path / "geo"
    paths = await geo.download_geo(dest=dest)
    assert paths == {"asn": dest / "asn.mmdb", "country": dest / "country.mmdb"}
    with GeoDB(dest) as db:
        assert db.lookup("8.8.8.8") == ("US", "AS15169", "Google LLC")
    assert sorted(p.name for p in dest.iterdir()) == ["asn.mmdb", "country.mmdb"]


@pytest.mark.shared
async def test_download_default_destination_is_geo_db_setting(geo_server, tmp_path):
    need_ipdb()
    await geo.download_geo()
    assert (tmp_path / "cache" / "vantage" / "geo" / "country.mmdb").is_file()


async def test_download_failures_change_nothing(geo_server, tmp_path):
    dest = tmp_path / "geo"
    dest.mkdir()
    (dest / "asn.mmdb").write_bytes(b"old asn")
    (dest / "country.mmdb").write_bytes(b"old country")
    real = dict(geo_server.files)

    geo_server.files.clear()
    geo_server.files["asn.mmdb.gz"] = real.get("asn.mmdb.gz", gzip.compress(b"x"))
    with pytest.raises(GeoError, match="HTTP 404"):
        await geo.download_geo(dest=dest)

    geo_server.files["country.mmdb.gz"] = b"this is not gzip"
    with pytest.raises(GeoError, match="not gzip data"):
        await geo.download_geo(dest=dest)

    geo_server.files["country.mmdb.gz"] = gzip.compress(b"gzip but not a database")[:-6]
    with pytest.raises(GeoError, match="truncated|not gzip"):
        await geo.download_geo(dest=dest)

    geo_server.files["country.mmdb.gz"] = gzip.compress(b"gzip but not a database")
    with pytest.raises(GeoError, match="not a MaxMind database"):
        await geo.download_geo(dest=dest)

    if real:
        # Right format, wrong file: an ASN database served as the country one.
        geo_server.files["country.mmdb.gz"] = real["asn.mmdb.gz"]
        with pytest.raises(GeoError, match="country database has no 'country' field"):
            await geo.download_geo(dest=dest)

    assert (dest / "asn.mmdb").read_bytes() == b"old asn"
    assert (dest / "country.mmdb").read_bytes() == b"old country"
    assert sorted(p.name for p in dest.iterdir()) == ["asn.mmdb", "country.mmdb"]


async def test_download_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VANTAGE_GEO_URL", f"http://127.0.0.1:{closed_port()}/")
    with pytest.raises(GeoError) as info:
        await geo.download_geo(dest=tmp_path / "geo", timeout=5)
    message = str(info.value)
    assert message.startswith("cannot download the geolocation databases: network unreachable (")
    assert "\n" not in message
    assert not (tmp_path / "geo").exists() or not list((tmp_path / "geo").iterdir())


def test_geo_url_default_and_env(monkeypatch):
    assert geo.geo_url() == "https://github.com/ooni/probe-assets/releases/latest/download/"
    monkeypatch.setenv("VANTAGE_GEO_URL", "http://mirror.example/geo")
    assert geo.geo_url() == "http://mirror.example/geo/"


# ---------------------------------------------------------------- probe location


def config(**kw):
    base = {"probe_cc": "", "probe_asn": "", "geo_db": ""}
    base.update(kw)
    return SimpleNamespace(**base)


def fixed_ip(ip):
    async def fetch():
        return ip
    return fetch


async def offline():
    raise OSError("Network is unreachable")


@pytest.mark.shared
async def test_location_from_public_ip(real_db_dir):
    loc = await discover_probe_location(config(geo_db=str(real_db_dir)), fixed_ip("8.8.8.8\n"))
    assert (loc.cc, loc.asn, loc.network_name, loc.warning) == ("US", "AS15169", "Google LLC", None)
    assert loc.ip_for_scrubbing == "8.8.8.8"
    # The address must not leak through the usual ways of printing or storing.
    assert "8.8.8.8" not in repr(loc)
    assert "8.8.8.8" not in json.dumps(loc.as_dict())


@pytest.mark.shared
async def test_overrides_win(real_db_dir):
    loc = await discover_probe_location(config(geo_db=str(real_db_dir), probe_cc="ir", probe_asn="AS12880"),
                                        fixed_ip("8.8.8.8"))
    assert (loc.cc, loc.asn, loc.network_name, loc.warning) == ("IR", "AS12880", None, None)
    loc = await discover_probe_location(config(geo_db=str(real_db_dir), probe_asn="AS15169"), fixed_ip("8.8.8.8"))
    assert (loc.cc, loc.asn, loc.network_name) == ("US", "AS15169", "Google LLC")
    loc = await discover_probe_location(config(geo_db=str(real_db_dir), probe_cc="DE"), fixed_ip("10.0.0.1"))
    assert loc.cc == "DE" and loc.asn == "AS0" and "not in the geolocation database" in loc.warning


async def test_overrides_need_no_network(tmp_path):
    loc = await discover_probe_location(config(geo_db=str(tmp_path), probe_cc="IR", probe_asn="AS197207"), offline)
    assert (loc.cc, loc.asn, loc.warning, loc.ip_for_scrubbing) == ("IR", "AS197207", None, None)


async def test_offline_gives_unknown_with_warning(tmp_path):
    loc = await discover_probe_location(config(geo_db=str(tmp_path)), offline)
    assert (loc.cc, loc.asn, loc.network_name) == ("ZZ", "AS0", None)
    assert loc.warning.startswith("probe location unknown (ZZ, AS0): cannot find the public IP address")
    assert "\n" not in loc.warning and loc.ip_for_scrubbing is None


async def test_missing_database_gives_unknown_with_warning(tmp_path):
    loc = await discover_probe_location(config(geo_db=str(tmp_path / "none")), fixed_ip("192.0.2.7"))
    assert (loc.cc, loc.asn) == ("ZZ", "AS0")
    assert "vantage geo update" in loc.warning
    assert loc.ip_for_scrubbing == "192.0.2.7"


async def test_garbage_from_ip_service(tmp_path):
    loc = await discover_probe_location(config(geo_db=str(tmp_path)), fixed_ip("<html>rate limited</html>"))
    assert (loc.cc, loc.asn) == ("ZZ", "AS0") and "not an IP address" in loc.warning
    assert loc.ip_for_scrubbing is None


async def test_slow_ip_service_times_out(tmp_path):
    async def slow():
        await asyncio.sleep(10)
        return "192.0.2.1"

    async def bounded():
        return await asyncio.wait_for(slow(), 0.05)

    loc = await discover_probe_location(config(geo_db=str(tmp_path)), bounded)
    assert "timed out" in loc.warning


async def test_fetch_public_ip_against_loopback(geo_server):
    assert await geo.fetch_public_ip(url=geo_server.base + "ip") == "8.8.8.8"
    with pytest.raises(Exception):
        await geo.fetch_public_ip(url=f"http://127.0.0.1:{closed_port()}/", timeout=2)


# ---------------------------------------------------------------- CLI


@pytest.mark.shared
def test_cli_lookup(real_db_dir):
    result = CliRunner().invoke(geo_group, ["lookup", "--dir", str(real_db_dir), "--json", "8.8.8.8", "10.0.0.1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows[0] == {"ip": "8.8.8.8", "cc": "US", "asn": "AS15169", "network_name": "Google LLC"}
    assert rows[1]["asn"] == "AS0"


@pytest.mark.shared
async def test_cli_update_against_loopback(geo_server, tmp_path):
    need_ipdb()
    result = await asyncio.to_thread(CliRunner().invoke, geo_group, ["update", "--dir", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "asn: GeoLite2-ASN" in result.output


def run_geo(args, env):
    """The error path of `vantage` (cli.main): VantageError → `vantage: <one line>`, exit 2."""
    return subprocess.run([sys.executable, "-m", "cli.main", "geo", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ, **env), timeout=60)


def test_cli_errors_are_one_line(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "c"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    result = run_geo(["lookup", "8.8.8.8"], env)
    assert result.returncode == 2 and "run `vantage geo update` first" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    result = run_geo(["update"], dict(env, VANTAGE_GEO_URL=f"http://127.0.0.1:{closed_port()}/"))
    assert result.returncode == 2
    assert result.stderr.startswith("vantage: cannot download the geolocation databases: network unreachable")
    assert result.stderr.strip().count("\n") == 0
