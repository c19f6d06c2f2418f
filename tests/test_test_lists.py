"""test_lists: loader, bundled default list, download (loopback server only) and CLI."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from test_lists import download, loader
from cli.lists import lists
from test_lists.loader import Entry, ListError, load_input_file, load_list, resolve_list

SHARED_LISTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "test-lists"
HEADER = "url,category_code,category_description,date_added,source,notes\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VANTAGE_TEST_LISTS_URL", raising=False)
    return tmp_path / "cache" / "vantage" / "test-lists"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- loader


def test_load_list_basic_and_dedup(tmp_path):
    path = write(tmp_path, "global.csv", HEADER +
                 "https://a.example/,NEWS,News Media,2020-01-01,citizenlab,\n"
                 "http://b.example/x,humr,Human Rights Issues,2020-01-01,citizenlab,\"note, with comma\"\n"
                 "HTTPS://A.EXAMPLE/,NEWS,News Media,2020-01-01,citizenlab,duplicate\n"
                 "\n")
    entries = load_list(path)
    assert [e.url for e in entries] == ["https://a.example/", "http://b.example/x"]
    assert entries[1].category_code == "HUMR"
    assert entries[1].notes == "note, with comma"
    assert entries[0] == Entry("https://a.example/", "NEWS", "News Media", "2020-01-01", "citizenlab", "")


def test_category_filter_is_case_insensitive(tmp_path):
    path = write(tmp_path, "l.csv", HEADER +
                 "https://a.example/,NEWS,News,2020-01-01,x,\n"
                 "https://b.example/,HUMR,HR,2020-01-01,x,\n"
                 "https://c.example/,FEXP,old code,2020-01-01,x,\n")
    assert [e.url for e in load_list(path, ["news"])] == ["https://a.example/"]
    assert len(load_list(path, ["News", "humr"])) == 2
    assert [e.url for e in load_list(path, ["fexp"])] == ["https://c.example/"]  # old code present in the file
    assert load_list(path, ["PORN"]) == []  # known code, simply absent
    with pytest.raises(ListError, match="unknown category code 'NWES'"):
        load_list(path, ["nwes"])


@pytest.mark.parametrize("body,message", [
    (HEADER + "https://ok.example/,NEWS,N,2020,x,\nfoo,NEWS,N,2020,x,\n",
     "bad.csv:3: url 'foo' is not an http(s) URL"),
    (HEADER + "ftp://files.example/,FILE,F,2020,x,\n", "bad.csv:2: url 'ftp://files.example/' is not an http(s) URL"),
    (HEADER + "https://a.example/,NEWS,N,2020\n", "bad.csv:2: 4 columns, the header has 6"),
    (HEADER + "https://a.example/,NEWS,N,2020,x,,extra\n", "bad.csv:2: 7 columns"),
    ("address,category_code\nhttps://a.example/,NEWS\n", "bad.csv:1: no 'url' column"),
    ("https://a.example/,NEWS,N,2020,x,\n", "bad.csv:1: no 'url' column"),
    ("", "bad.csv: empty file"),
    (HEADER + "https://a.example:99999/,NEWS,N,2020,x,\n", "bad.csv:2: url 'https://a.example:99999/' is not a valid URL"),
    (HEADER + "https://a.example/,NEWS,\"multi\nline\",2020,x,\nhttp:///nohost,NEWS,N,2020,x,\n",
     "bad.csv:4: url 'http:///nohost'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, message):
    path = write(tmp_path, "bad.csv", body)
    with pytest.raises(ListError) as info:
        load_list(path)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bom_and_missing_file_and_binary(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff" + HEADER + "https://a.example/,NEWS,N,2020,x,\n").encode("utf-8"))
    assert len(load_list(path)) == 1
    with pytest.raises(ListError, match="no such file"):
        load_list(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ListError, match="bin.csv: not UTF-8"):
        load_list(tmp_path / "bin.csv")


def test_input_file(tmp_path):
    path = write(tmp_path, "urls.txt",
                 "# my sites\n\nhttps://a.example/\n  http://b.example/page#frag   # trailing comment\n"
                 "https://a.example/\n")
    entries = load_input_file(path)
    assert [e.url for e in entries] == ["https://a.example/", "http://b.example/page#frag"]
    assert entries[0].category_code == ""
    bad = write(tmp_path, "bad.txt", "https://a.example/\nexample.org\n")
    with pytest.raises(ListError, match=r"bad.txt:2: url 'example.org' is not an http\(s\) URL"):
        load_input_file(bad)


def test_entries_from_urls():
    entries = loader.entries_from_urls(["https://a.example/", "https://a.example/", "http://b.example"])
    assert [e.url for e in entries] == ["https://a.example/", "http://b.example"]
    with pytest.raises(ListError, match="not an http"):
        loader.entries_from_urls(["javascript:alert(1)"])


# ---------------------------------------------------------------- default list


HIGH_RISK = {"LGBT", "ANON", "HUMR", "POLR", "REL"}


def test_default_list_is_small_valid_and_ours():
    raw = loader.DEFAULT_LIST.read_text(encoding="utf-8").splitlines()
    assert raw[0] == HEADER.strip()
    assert len(raw) < 100
    entries = load_list(loader.DEFAULT_LIST)
    high = load_list(loader.HIGH_RISK_LIST)
    # Issue 10, item 7: the high-risk categories moved out of the default
    # list into the bundled high-risk list; together they are the list of old.
    assert 25 <= len(entries) <= 60 and 35 <= len(entries) + len(high) <= 60
    assert len({e.url for e in entries + high}) == len(entries) + len(high)
    assert all(e.date_added == "2026-11-26" and e.source == "vantage" for e in entries + high)
    codes = {e.category_code for e in entries}
    assert {"NEWS", "GRP", "COMT", "SRCH", "CTRL"} <= codes
    assert codes <= set(loader.CATEGORY_CODES)
    assert resolve_list("default") == loader.DEFAULT_LIST


def test_default_list_holds_no_high_risk_category_and_high_risk_is_one_flag_away():
    # Fails before issue 10: default.csv held LGBT, ANON, HUMR, POLR and REL sites.
    assert not {e.category_code for e in load_list(loader.DEFAULT_LIST)} & HIGH_RISK
    high = load_list(resolve_list("high-risk"))
    assert {e.category_code for e in high} == HIGH_RISK
    assert loader.load_named("high-risk", ["lgbt"]) and all(e.category_code == "LGBT" for e in loader.load_named("high-risk", ["lgbt"]))
    raw = loader.HIGH_RISK_LIST.read_text(encoding="utf-8").splitlines()
    assert raw[0] == HEADER.strip()
    result = CliRunner().invoke(lists, ["show", "--list", "high-risk", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["list"] == "high-risk" and data["count"] == len(high)


# ---------------------------------------------------------------- real Citizen Lab files


@pytest.mark.shared
def test_real_citizen_lab_lists_parse():
    if not SHARED_LISTS.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_LISTS} missing in CI")
        pytest.skip("shared test lists not available")
    files = sorted(SHARED_LISTS.glob("[a-z]*.csv"))
    assert len(files) > 100
    for path in files:
        load_list(path)
    entries = load_list(SHARED_LISTS / "global.csv")
    assert len(entries) > 1000
    assert all(e.url.startswith(("http://", "https://")) for e in entries)
    assert load_list(SHARED_LISTS / "global.csv", ["lgbt"])


# ---------------------------------------------------------------- resolve_list


def test_resolve_list_names(tmp_path, isolated_cache):
    with pytest.raises(ListError, match=r"run `vantage lists update` first"):
        resolve_list("global")
    with pytest.raises(ListError, match=r"run `vantage lists update --country IR` first"):
        resolve_list("IR")
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "ir.csv").write_text(HEADER + "https://a.example/,NEWS,N,2020,x,\n")
    assert resolve_list("IR") == isolated_cache / "ir.csv"
    assert len(loader.load_named("ir")) == 1
    path = write(tmp_path, "mine.csv", HEADER)
    assert resolve_list(str(path)) == path
    with pytest.raises(ListError, match="no test list named 'nope.csv'"):
        resolve_list("nope.csv")


# ---------------------------------------------------------------- download (loopback only)


GLOBAL_BODY = HEADER + "https://g1.example/,NEWS,N,2020,citizenlab,\nhttps://g2.example/,HUMR,H,2020,citizenlab,\n"
IR_BODY = HEADER + "https://ir1.example/,POLR,P,2020,citizenlab,\n"


@pytest.fixture
async def list_server(monkeypatch, serve_app):
    files = {"global.csv": GLOBAL_BODY, "ir.csv": IR_BODY, "xx.csv": HEADER + "notaurl,NEWS,N,2020,x,\n"}
    hits: list[str] = []

    async def handler(request):
        name = request.match_info["name"]
        hits.append(name)
        if name not in files:
            return web.Response(status=404, text="404: Not Found")
        return web.Response(text=files[name], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/lists/{name}", handler)
    monkeypatch.setenv("VANTAGE_TEST_LISTS_URL", await serve_app(app) + "/lists")
    yield files, hits


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


async def test_download_global_and_country(list_server, isolated_cache):
    files, hits = list_server
    result = await download.download_lists(["IR"])
    assert [(r.name, r.entries) for r in result] == [("global", 2), ("ir", 1)]
    assert (isolated_cache / "global.csv").read_text() == GLOBAL_BODY
    assert [e.url for e in load_list(resolve_list("ir"))] == ["https://ir1.example/"]
    assert sorted(hits) == ["global.csv", "ir.csv"]
    assert not [p for p in isolated_cache.iterdir() if p.name.startswith(".")]


async def test_download_failure_keeps_previous_cache(list_server, isolated_cache):
    await download.download_lists([])
    before = (isolated_cache / "global.csv").read_text()
    files, _ = list_server
    files["global.csv"] = GLOBAL_BODY.replace("g1", "changed")
    with pytest.raises(download.DownloadError, match="no list for 'de'.*HTTP 404"):
        await download.download_lists(["de"])
    with pytest.raises(download.DownloadError, match=r"xx.csv \(downloaded\):2: url 'notaurl'.*cache left unchanged"):
        await download.download_lists(["xx"])
    assert (isolated_cache / "global.csv").read_text() == before  # all-or-nothing
    assert sorted(p.name for p in isolated_cache.iterdir()) == ["global.csv"]


async def test_download_offline_is_one_clear_line(monkeypatch, isolated_cache):
    monkeypatch.setenv("VANTAGE_TEST_LISTS_URL", f"http://127.0.0.1:{closed_port()}/")
    with pytest.raises(download.DownloadError) as info:
        await download.download_lists([], timeout=5)
    message = str(info.value)
    assert message.startswith("cannot download the test lists: network unreachable (")
    assert "\n" not in message
    assert not isolated_cache.exists() or not list(isolated_cache.iterdir())


def test_bad_country_code():
    with pytest.raises(ListError, match="'iran' is not a two-letter country code"):
        download.list_names(["iran"])
    assert download.list_names(["IR", "ir", "cis"]) == ["global", "ir", "cis"]


def test_base_url_default_and_env(monkeypatch):
    assert download.base_url() == download.DEFAULT_BASE_URL
    monkeypatch.setenv("VANTAGE_TEST_LISTS_URL", "http://mirror.example/lists")
    assert download.base_url() == "http://mirror.example/lists/"


# ---------------------------------------------------------------- CLI


def test_cli_show_default_table_and_json():
    runner = CliRunner()
    result = runner.invoke(lists, ["show", "--category", "ctrl"])
    assert result.exit_code == 0, result.output
    assert "https://example.com/" in result.output and "2 entries" in result.output
    result = runner.invoke(lists, ["show", "--json", "--category", "NEWS", "--category", "grp"])
    data = json.loads(result.output)
    assert data["count"] == len(data["entries"]) > 0
    assert {e["category_code"] for e in data["entries"]} == {"NEWS", "GRP"}
    result = runner.invoke(lists, ["show", "--list", "high-risk", "--json", "--category", "HUMR", "--category", "lgbt"])
    assert {e["category_code"] for e in json.loads(result.output)["entries"]} == {"HUMR", "LGBT"}


def test_cli_show_input_file(tmp_path):
    path = write(tmp_path, "u.txt", "https://a.example/\n")
    result = CliRunner().invoke(lists, ["show", "--input-file", str(path), "--json"])
    assert json.loads(result.output)["count"] == 1


def run_main(args, env=None):
    """The error path of `vantage` (cli.main): VantageError → `vantage: <one line>`, exit 2.

    cli.main imports only the `lists` command's module for `vantage lists ...`.
    """
    import subprocess
    import sys

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, env=full_env, timeout=60)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "c")}
    result = run_main(["lists", "show", "--list", "global"], env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "run `vantage lists update` first" in result.stderr
    result = run_main(["lists", "update"], dict(env, VANTAGE_TEST_LISTS_URL=f"http://127.0.0.1:{closed_port()}/"))
    assert result.returncode == 2
    assert result.stderr.startswith("vantage: cannot download the test lists: network unreachable")
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "c" / "vantage" / "test-lists" / "global.csv").exists()


async def test_cli_update_against_loopback(list_server, isolated_cache):
    import asyncio

    # The CLI calls asyncio.run, so run it off this test's event loop.
    result = await asyncio.to_thread(CliRunner().invoke, lists, ["update", "--country", "ir"])
    assert result.exit_code == 0, result.output
    assert "global: 2 entries" in result.output and "ir: 1 entries" in result.output
    result = await asyncio.to_thread(CliRunner().invoke, lists, ["show", "--list", "ir", "--json"])
    assert json.loads(result.output)["entries"][0]["url"] == "https://ir1.example/"
