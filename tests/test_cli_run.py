"""`vantage run` end to end: loopback sites, an offline machine, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import pytest

from rootonly import require_root

ROOT = Path(__file__).resolve().parent.parent


def vantage(*args: str, env: dict | None = None, prefix: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = (prefix or []) + [sys.executable, "-m", "cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture
def home(tmp_path):
    """An isolated HOME/XDG so config, consent and the default DB stay in tmp."""
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("VANTAGE_DB", None)
    return env


async def test_run_measures_loopback_sites_and_stores_them(tmp_path, home, http_server, dns_server):
    dns_server.program("localhost", a=["127.0.0.1"])
    db = tmp_path / "v.duckdb"
    page = http_server.url("/page", host="localhost")
    missing = http_server.url("/status/404", host="127.0.0.1")
    proc = await _run_async(["run", "web", "--url", page, "--url", missing, "--db", str(db), "--yes", "--json",
                             "--resolver", dns_server.address, "--no-doh", "--probe-cc", "IT", "--probe-asn", "30722"], home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)[0]
    assert summary["measured"] == 2 and summary["status"] == "finished"
    con = duckdb.connect(str(db), read_only=True)
    rows = dict(con.execute("SELECT input, control_failure FROM measurements").fetchall())
    assert rows == {page: "no_helper_configured", missing: "no_helper_configured"}
    cc, asn = con.execute("SELECT DISTINCT probe_cc, probe_asn FROM measurements").fetchone()
    assert (cc, asn) == ("IT", "AS30722")
    status = dict(con.execute("SELECT url, status_code FROM http_transactions WHERE side='probe'").fetchall())
    assert status[page] == 200 and status[missing] == 404
    engines = {r[0] for r in con.execute("SELECT engine FROM dns_answers WHERE side='probe'").fetchall()}
    assert engines == {"system", "udp"}
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "finished"
    listed = vantage("results", "list", "--db", str(db), "--json", env=home)
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["measured"] == 2


async def _run_async(args, env):
    import asyncio

    # The loopback servers live on this test's event loop: run the CLI in a
    # subprocess without blocking it.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def test_offline_probe_stores_every_url_and_does_not_claim_censorship(tmp_path, home):
    require_root("ip")
    ns = f"voff-{uuid.uuid4().hex[:6]}"
    db = tmp_path / "offline.duckdb"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = vantage("run", "web", "--db", str(db), "--yes", "--json", "--max-runtime", "100",
                       env=home, prefix=["ip", "netns", "exec", ns], timeout=180)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)[0]
    from test_lists import loader

    expected = len(loader.load_list(loader.resolve_list("default")))
    assert summary["measured"] == expected
    assert summary["network_unreachable"] == expected
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == expected
    assert con.execute("SELECT count(*) FROM measurements WHERE probe_network_ok").fetchone()[0] == 0
    # The human summary says so in words.
    human = vantage("results", "list", "--db", str(db), env=home)
    assert human.returncode == 0


def test_offline_summary_says_network_unreachable(tmp_path, home):
    require_root("ip")
    ns = f"voff-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        proc = vantage("run", "--url", "https://example.org/", "--db", str(tmp_path / "o.duckdb"), "--yes",
                       env=dict(home, COLUMNS="200"), prefix=["ip", "netns", "exec", ns])
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, proc.stderr
    assert "network is unreachable" in proc.stdout
    assert "censorship" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--bogus"], "No such option"),
    (["run", "--url", "ftp://example.org/"], "not an http(s) URL"),
    (["run", "--url", "https://a.example/", "--db", "/proc/nope/v.duckdb"], "cannot create the directory"),
    (["results", "show", "NOPE", "--db", "{tmp}/empty.duckdb"], "no database"),
    (["run", "--url", "https://a.example/", "--ca-file", "{self}", "--db", "{tmp}/v.duckdb"], "--ca-file"),
    (["run", "--url", "https://a.example/", "--category", "NEWS", "--db", "{tmp}/v.duckdb"], "--category"),
    (["run", "--url", "https://a.example/", "--resolver", "not-an-ip", "--db", "{tmp}/v.duckdb"], "resolver"),
    (["run", "--url", "https://a.example/", "--public-network", "nonsense", "--db", "{tmp}/v.duckdb"], "--public-network"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, home, args, message):
    args = [a.replace("{tmp}", str(tmp_path)).replace("{self}", __file__) for a in args]
    proc = vantage(*args, "--yes" if args[0] == "run" else "--json", env=home)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_list_names_file_and_line(tmp_path, home):
    bad = tmp_path / "bad.csv"
    bad.write_text("url,category_code,category_description,date_added,source,notes\n"
                   "https://ok.example/,NEWS,News,2024-01-01,x,\n"
                   "notaurl,NEWS,News,2024-01-01,x,\n")
    db = tmp_path / "v.duckdb"
    proc = vantage("run", "--list", str(bad), "--db", str(db), "--yes", env=home)
    assert proc.returncode == 2
    assert "bad.csv:3" in proc.stderr and "Traceback" not in proc.stderr


def test_no_consent_without_a_terminal_is_refused(tmp_path, home):
    proc = vantage("run", "--url", "https://a.example/", "--db", str(tmp_path / "v.duckdb"), env=home)
    assert proc.returncode == 2
    assert "consent" in proc.stderr
    assert not (tmp_path / "v.duckdb").exists()  # nothing measured without consent


async def test_ctrl_c_keeps_finished_measurements_and_resume_finishes_the_run(tmp_path, home, http_server, dns_server):
    import asyncio
    import signal

    dns_server.program("localhost", a=["127.0.0.1"])
    db = tmp_path / "v.duckdb"
    fast = http_server.url("/page", host="127.0.0.1")
    slow = http_server.url("/trickle", host="localhost")  # drips forever: still running at Ctrl-C
    args = ["run", "web", "--url", fast, "--url", slow, "--db", str(db), "--yes", "--quiet",
            "--resolver", dns_server.address, "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=home,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130, err.decode()
    assert "resume" in err.decode() and "Traceback" not in err.decode()
    con = duckdb.connect(str(db), read_only=True)
    run_id, status = con.execute("SELECT run_id, status FROM runs").fetchone()
    assert status == "interrupted"
    # Issue 10, item 8: the hint names the run itself (it said RUN_ID).
    assert f"resume with `vantage run --resume {run_id}`" in err.decode()
    assert [r[0] for r in con.execute("SELECT input FROM measurements").fetchall()] == [fast]
    con.close()

    resumed = await _run_async(["run", "--resume", run_id, "--db", str(db), "--yes", "--json"], home)
    assert resumed.returncode == 0, resumed.stderr
    con = duckdb.connect(str(db), read_only=True)
    assert sorted(r[0] for r in con.execute("SELECT input FROM measurements WHERE run_id = ?", [run_id]).fetchall()) == sorted([fast, slow])
    assert con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] == "finished"


# ---------------------------------------------------------------- issue 10: consent, errors, resume


def _closed_run_args(tmp_path, *extra: str) -> list[str]:
    """A `vantage run` that measures one refused loopback URL: no DNS, no
    DoH, no geolocation, no internet."""
    from servers import closed_port

    return ["run", "--url", f"http://127.0.0.1:{closed_port()}/", "--db", str(tmp_path / "v.duckdb"), "--no-doh",
            "--resolver", f"127.0.0.1:{closed_port()}", "--probe-cc", "ZZ", "--probe-asn", "AS0", "--json", *extra]


def test_every_yes_run_prints_the_notice_essentials_and_the_missing_helper(tmp_path, home):
    from cli.consent import list_categories
    from test_lists import loader

    config = Path(home["XDG_CONFIG_HOME"]) / "vantage" / "config.toml"
    for attempt in ("first", "consent already recorded"):
        proc = vantage(*_closed_run_args(tmp_path, "--yes"), env=home)
        assert proc.returncode == 0, proc.stderr
        err = proc.stderr
        assert "--yes" in err and "consent" in err, (attempt, err)
        assert "can see" in err and "dangerous" in err
        flat = " ".join(err.split())
        # Which categories the default list holds: read from the file, not a fixed text.
        assert "default list holds only: " + ", ".join(list_categories(loader.DEFAULT_LIST)) in flat
        assert "(" + ", ".join(list_categories(loader.HIGH_RISK_LIST)) + ") are in --list high-risk" in flat
        assert f"consent_given = false in the config file: {config}" in flat
        assert len(err.splitlines()) <= 12
        helper_lines = [line for line in err.splitlines() if "helper" in line]
        assert len(helper_lines) == 1 and "every verdict will be inconclusive" in helper_lines[0]
        assert json.loads(proc.stdout)[0]["measured"] == 1
    assert "consent_given = true" in config.read_text()
    with_helper = vantage(*_closed_run_args(tmp_path, "--helper", "https://helper.example/"), env=home)
    assert with_helper.returncode == 0, with_helper.stderr
    assert "inconclusive" not in with_helper.stderr and "--yes" not in with_helper.stderr


def test_notice_says_what_the_default_list_holds_and_where_the_config_is(tmp_path, home):
    from click.testing import CliRunner

    from cli import consent as cli_consent
    from probes.config import load_config

    config = load_config(tmp_path / "c.toml")
    result = CliRunner().invoke(click_ask(cli_consent, config), input="n\n")
    text = " ".join(result.output.split())
    default, high_risk = cli_consent.bundled_categories()
    assert set(high_risk) == {"LGBT", "ANON", "HUMR", "POLR", "REL"} and not set(default) & set(high_risk)
    for code in list(default) + list(high_risk):
        assert f"({code})" in text or f" {code}," in text or f" {code}." in text
    assert "--list high-risk" in text and "holds only these categories" in text
    assert f"set consent_given = false in the config file: {tmp_path / 'c.toml'}" in text


def click_ask(cli_consent, config):
    import click

    @click.command()
    def cmd():
        click.echo(f"result={cli_consent.ensure_consent(config, assume_yes=False, interactive=True)}")

    return cmd


def test_extra_ca_file_naming_a_missing_file_is_one_line_with_the_path(tmp_path, home):
    missing = tmp_path / "gone" / "lab-ca.pem"
    config = tmp_path / "c.toml"
    config.write_text(f'extra_ca_file = "{missing}"\n')
    for args, env in ((["--config", str(config)], home), ([], dict(home, VANTAGE_EXTRA_CA_FILE=str(missing)))):
        proc = vantage(*_closed_run_args(tmp_path, "--yes", *args), env=env)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(missing) in lines[0] and "extra_ca_file" in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert not (tmp_path / "v.duckdb").exists()
    # A run started with --ca-file whose file has gone since: its resume says so.
    from probes import runner
    from probes.store import connect

    con = connect(tmp_path / "r.duckdb")
    run_id = runner.new_id()
    runner.start_run(con, run_id, runner.experiments("web")[0], [("https://a.example/", None)],
                     {"test": "web", "ca_file": str(missing)}, runner.Location())
    runner.finish_run(con, run_id, "interrupted")
    con.close()
    proc = vantage("run", "--resume", run_id, "--db", str(tmp_path / "r.duckdb"), "--yes", env=home)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(missing) in lines[0], proc.stderr


def test_non_utf8_config_file_is_one_line_naming_it(tmp_path, home):
    config = tmp_path / "latin1.toml"
    config.write_bytes('probe_cc = "\xe9"\n'.encode("latin-1"))
    proc = vantage(*_closed_run_args(tmp_path, "--yes", "--config", str(config)), env=home)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(config) in lines[0] and "UTF-8" in lines[0], proc.stderr


def test_analyze_with_a_mistyped_db_is_one_line_and_creates_nothing(tmp_path, home):
    target = tmp_path / "typo" / "x.duckdb"
    for extra in ([], ["--json"]):
        proc = vantage("analyze", "--db", str(target), *extra, env=home)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and str(target) in lines[0], proc.stderr
        assert proc.stdout == ""
    assert not (tmp_path / "typo").exists()


def test_resume_reuses_the_runs_concurrency_unless_given_again(tmp_path, home, monkeypatch):
    """Issue 10, item 10: `--resume` forgot `--concurrency`."""
    from click.testing import CliRunner

    from cli.run import run as run_command
    from probes import runner

    calls = []

    async def fake_run_tests(con, db_file, tests, inputs, options, config, *, concurrency=None, **kw):
        calls.append({"concurrency": concurrency, "options": dict(options), "resume_id": kw.get("resume_id")})
        return []

    monkeypatch.setattr(runner, "run_tests", fake_run_tests)
    for key in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(key, home[key])
    db = tmp_path / "v.duckdb"
    base = ["--db", str(db), "--yes", "--json", "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0"]
    cli = CliRunner()
    result = cli.invoke(run_command, ["--url", "https://a.example/", "--concurrency", "3", *base])
    assert result.exit_code == 0, result.output
    assert calls[-1]["concurrency"] == 3 and calls[-1]["options"]["concurrency"] == 3

    # The run as --resume finds it: started with --concurrency 3, then interrupted.
    from probes.store import connect

    con = connect(db)
    run_id = runner.new_id()
    runner.start_run(con, run_id, runner.experiments("web")[0], [("https://a.example/", None)], calls[-1]["options"],
                     runner.Location())
    runner.finish_run(con, run_id, "interrupted")
    con.close()

    result = cli.invoke(run_command, ["--resume", run_id, *base])
    assert result.exit_code == 0, result.output
    assert calls[-1]["resume_id"] == run_id and calls[-1]["concurrency"] == 3
    result = cli.invoke(run_command, ["--resume", run_id, "--concurrency", "7", *base])
    assert result.exit_code == 0, result.output
    assert calls[-1]["concurrency"] == 7  # an explicit --concurrency on the resume command wins
    # Without --concurrency, a new run records the setting it ran with.
    result = cli.invoke(run_command, ["--url", "https://b.example/", *base])
    assert calls[-1]["concurrency"] == 50 and calls[-1]["options"]["concurrency"] == 50


def test_main_called_from_python_never_hands_the_process_over(monkeypatch, capsys):
    """`vantage run` exec's over its own process only when it is the program
    (cli.main.program): a caller of main() (a test, a script) is never replaced."""
    from cli import common, main

    monkeypatch.setattr(common, "OWN_PROGRAM", False)
    monkeypatch.setattr(sys, "argv", ["vantage", "--help"])
    try:
        main.main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "Commands:" in capsys.readouterr().out
    assert common.OWN_PROGRAM is False
