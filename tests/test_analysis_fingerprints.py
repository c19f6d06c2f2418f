"""Fingerprint loading, SQL matching and `vantage fingerprints update`."""

from __future__ import annotations

import pytest
from aiohttp import web

from analysis import fingerprints as F
from shared import shared_path


def shared_or_skip():
    return shared_path("data", "fingerprints")


def test_load_shared_sets():
    fps = F.load(shared_or_skip())
    assert fps.version.startswith("fp-") and len(fps.version) == 15
    assert len(fps.dns) == 226
    sources = {r.source for r in fps.http}
    assert sources == {"ooni", "censoredplanet"}
    assert any(r.false_positive for r in fps.http if r.source == "censoredplanet")  # false positives loaded


def test_missing_dir_is_empty_set(tmp_path):
    fps = F.load(tmp_path / "nothing")
    assert fps.empty and fps.version == "none"


def test_pattern_types_become_anchored_regexes():
    import duckdb

    csv = ("name,scope,other_names,location_found,pattern_type,pattern\n"
           "t.c,isp,,body,contains,blocked (by law)\n"
           "t.p,isp,,header.location,prefix,http://block.example/\n"
           "t.f,isp,,body,full,DENIED\n")
    rows = F.parse_ooni_http(csv)
    con = duckdb.connect()
    F.install(con, F.FingerprintSet(version="t", http=rows))
    def hit(name, text):
        return con.execute("SELECT regexp_matches(?, regex) FROM fp_http WHERE name = ?", [text, name]).fetchone()[0]
    assert hit("t.c", "page: blocked (by law).") and not hit("t.c", "blocked by law")
    assert hit("t.p", "server: x\nlocation: http://block.example/?u=1") and not hit("t.p", "location: https://x/http://block.example/")
    assert hit("t.f", "DENIED") and not hit("t.f", "DENIED!")


def test_uncompilable_patterns_are_dropped():
    import duckdb

    con = duckdb.connect()
    rows = F.parse_cp('{"fingerprint": "bad", "pattern": "(?<=x)y"}\n{"fingerprint": "good", "pattern": "y+"}\n', False)
    counts = F.install(con, F.FingerprintSet(version="t", http=rows))
    assert counts == {"http": 1, "dns": 0, "dropped": 1}


@pytest.fixture
async def mirror(tmp_path, serve_app):
    src = shared_or_skip()
    state = {"fail": set()}

    async def serve(request):
        name = request.match_info["name"]
        if name in state["fail"]:
            return web.Response(status=404)
        path = src / name if (src / name).exists() else src / "censoredplanet" / name
        return web.Response(body=path.read_bytes())

    app = web.Application()
    app.router.add_get("/ooni/{name}", serve)
    app.router.add_get("/cp/{name}", serve)
    yield await serve_app(app), state


async def test_update_downloads_all_files(mirror, tmp_path, monkeypatch):
    import asyncio

    base, _ = mirror
    monkeypatch.setenv(F.OONI_BASE_ENV, base + "/ooni")
    monkeypatch.setenv(F.CP_BASE_ENV, base + "/cp/")
    target = tmp_path / "cache"
    fps = await asyncio.to_thread(F.update, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(F.FILES)
    assert F.load(target).version == fps.version == F.load(shared_or_skip()).version
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]  # no temporary left behind


async def _update_fails_and_installs_nothing(base: str, tmp_path, monkeypatch, match: str) -> None:
    """An update from the mirror at ``base`` raises FingerprintError matching
    ``match`` and leaves no file in the target directory."""
    import asyncio

    monkeypatch.setenv(F.OONI_BASE_ENV, base + "/ooni")
    monkeypatch.setenv(F.CP_BASE_ENV, base + "/cp")
    target = tmp_path / "cache"
    with pytest.raises(F.FingerprintError, match=match):
        await asyncio.to_thread(F.update, target)
    assert not target.exists() or not any(target.iterdir())


async def test_update_failure_writes_nothing(mirror, tmp_path, monkeypatch):
    base, state = mirror
    state["fail"].add(F.CP_FALSE_POSITIVES)
    await _update_fails_and_installs_nothing(base, tmp_path, monkeypatch, "HTTP 404")


def test_update_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(F.OONI_BASE_ENV, "http://127.0.0.1:9/")
    monkeypatch.setenv(F.CP_BASE_ENV, "http://127.0.0.1:9/")
    with pytest.raises(F.FingerprintError) as info:
        F.update(tmp_path / "c", timeout=5)
    assert "\n" not in str(info.value) and "cannot download" in str(info.value)


async def test_update_refuses_an_oversized_file(mirror, tmp_path, monkeypatch):
    base, _ = mirror
    monkeypatch.setattr(F, "MAX_FILE_BYTES", 1024)  # every shared file is larger
    await _update_fails_and_installs_nothing(base, tmp_path, monkeypatch, "larger than")


def test_default_dir_is_in_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VANTAGE_FINGERPRINTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert F.default_dir() == tmp_path / "vantage" / "fingerprints"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG rule of core.paths
    assert F.default_dir().is_absolute()
    monkeypatch.setenv("VANTAGE_FINGERPRINTS_DIR", str(tmp_path / "fp"))
    assert F.default_dir() == tmp_path / "fp"
