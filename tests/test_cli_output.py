"""What `vantage` prints: network text is escaped and never rich markup, and
the output reads at 80 columns (issue 10, items 2 and 8).

Hostile values are stored in a real database with the probe's own writer
(the shape `vantage run` stores), then printed by the real commands with
COLUMNS=80.
"""

from __future__ import annotations

import collections
import json
import re

import pytest
from click.testing import CliRunner

from analysis_fixtures import control, http, page, q, tcp, tls, web
from cli.results import results
from probes import records as R
from probes import runner
from probes.store import connect, write_all

IP = "198.18.0.10"
# A <title> that, printed raw, retitles the terminal (OSC), clears the screen
# (CSI), uses a one-byte C1 CSI, reverses the text (bidi override), rings the
# bell, and would be rich markup (style, hyperlink) if printed as markup.
EVIL = "\x1b]0;pwned\x07\x1b[2J[bold red]x[/] [link=http://evil.example/]click[/link] \x9b31m \u202egnp.exe\x7f :smile:"
EVIL_URL = "https://evil.example/\x1b[2J[bold]"
EVIL_FAILURE = "\x1b]0;t\x07generic_timeout_error"
EVIL_CNAME = "\x1b[31mred.example."
# Whatever a terminal would act on: C0 (but the newlines we print), DEL, C1, bidi controls.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def wide80(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "50")


@pytest.fixture
def hostile_db(tmp_path):
    """A run of one measurement whose URL, title, headers, failure string
    and DNS answer are hostile; returns (path, run id, measurement id)."""
    path = tmp_path / "h.duckdb"
    con = connect(path)
    run_id = R.new_id()
    runner.start_run(con, run_id, runner.experiments("web")[0], [(EVIL_URL, "NEWS")], {"concurrency": 3},
                     runner.Location("ZZ", "AS64500"))
    query = q("evil.example", IP)
    query["answers"].append(R.dns_answer("CNAME", EVIL_CNAME))
    record = web(EVIL_URL, run_id=run_id, queries=[query], tcps=[tcp(IP)], tlss=[tls(IP, "evil.example")],
                 requests=[http(EVIL_URL, IP, body=page(EVIL), headers={"X-Evil": EVIL, "Content-Type": "text/html"},
                                failure=EVIL_FAILURE)],
                 ctl=control(addrs=(IP,), body=page("A"), title="A"))
    write_all(con, [(record, "NEWS")])
    runner.finish_run(con, run_id, "finished")
    con.close()
    return path, run_id, record["measurement_id"]


def invoke(*args: str):
    result = CliRunner().invoke(results, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def assert_inert(out: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in UNSAFE.findall(out)})
    assert not found, f"control characters printed raw: {found}"


# ---------------------------------------------------------------- item 2: escaping


def test_safe_escapes_every_control_and_bidi_character_and_keeps_text():
    from cli.common import safe

    assert safe("a\x1b]0;x\x07b") == "a\\x1b]0;x\\x07b"
    assert safe("\x9b31m\x7f\x00") == "\\x9b31m\\x7f\\x00"
    assert safe("l1\nl2\r\tx") == "l1\\nl2\\r\\tx"
    assert safe("\u202egnp.exe \u2066x\u2069 \u2028") == "\\u202egnp.exe \\u2066x\\u2069 \\u2028"
    # Text stays text: accents, scripts, joiners (Persian ZWNJ, emoji ZWJ), markup-looking brackets.
    kept = "é ñ ك\u200cه 👩\u200d💻 [bold]x[/] [link=u]y[/link]"
    assert safe(kept) == kept
    assert safe(None) == "None" and safe(3) == "3"
    for code in list(range(0x20)) + list(range(0x7F, 0xA0)):
        assert not UNSAFE.search(safe(chr(code)))


def test_results_show_measurement_prints_network_text_escaped_and_literally(hostile_db, wide80):
    path, _, mid = hostile_db
    out = invoke("show", mid, "--db", str(path))
    assert_inert(out)
    assert "title=\\x1b]0;pwned\\x07\\x1b[2J[bold red]x[/] [link=http://evil.example/]click[/link] \\x9b31m \\u202egnp.exe\\x7f :smile:" in out
    assert "failure=\\x1b]0;t\\x07generic_timeout_error" in out
    assert "answer=\\x1b[31mred.example." in out
    assert "input: https://evil.example/\\x1b[2J[bold]" in out


def test_results_show_run_and_list_tables_are_escaped_and_never_markup(hostile_db, wide80):
    path, run_id, mid = hostile_db
    con = connect(path)  # a database another tool wrote: its own words in the runs table too
    con.execute("UPDATE runs SET probe_asn = ?, test_name = ? WHERE run_id = ?", ["[link=http://x/]AS1[/link]", EVIL, run_id])
    con.close()
    shown = invoke("show", run_id, "--db", str(path))
    assert_inert(shown)
    assert "https://evil.example/\\x1b[2J[bold]" in shown  # literal brackets: not a style
    listed = invoke("list", "--db", str(path))
    assert_inert(listed)
    assert "[link=http://x/]AS1[/link]" in listed and "[bold red]x[/]" in listed


def test_json_output_escapes_controls_and_round_trips(hostile_db):
    path, run_id, mid = hostile_db
    for args in (("show", mid), ("show", run_id), ("list",)):
        out = invoke(*args, "--db", str(path), "--json")
        assert_inert(out)
        assert not re.search(r"[^\x0a\x20-\x7e]", out)  # ensure_ascii: every other character is \uNNNN
        data = json.loads(out)
        if args == ("show", mid):
            [tx] = [t for t in data["observations"]["http_transactions"] if t["side"] == "probe"]
            assert tx["title"] == EVIL and tx["failure"] == EVIL_FAILURE and tx["url"] == EVIL_URL
            assert EVIL_CNAME in {a["answer"] for a in data["observations"]["dns_answers"]}
        elif args == ("show", run_id):
            assert data["measurements"][0]["input"] == EVIL_URL


def test_analyze_table_escapes_what_it_prints(tmp_path, monkeypatch, wide80):
    from cli import analyze as cli_analyze

    path = tmp_path / "a.duckdb"
    connect(path).close()
    rows = [{"status": "blocked", "layer": "http", "method": EVIL, "count": 1, "confirmed": 0}]
    monkeypatch.setattr(cli_analyze, "run_analysis", lambda con, **kw: 1)
    monkeypatch.setattr(cli_analyze, "summary", lambda con: rows)
    result = CliRunner().invoke(cli_analyze.analyze, ["--db", str(path), "--fingerprints-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    assert "[bold" in result.output and "[link=" in result.output  # printed, not interpreted
    result = CliRunner().invoke(cli_analyze.analyze, ["--db", str(path), "--fingerprints-dir", str(tmp_path / "none"), "--json"])
    assert_inert(result.output)
    assert json.loads(result.output)["verdicts"][0]["method"] == EVIL


def test_run_summary_escapes_outcomes(capsys, wide80):
    from cli.run import _print_summary

    summary = runner.RunSummary(run_id=R.new_id(), status="finished", measured=1, total=1,
                                outcomes=collections.Counter({EVIL: 1}), seconds=1.0)
    _print_summary([summary], as_json=False, db_file="v.duckdb")
    out = capsys.readouterr().out
    assert_inert(out)
    assert "[bold red]x[/]" in out


# ---------------------------------------------------------------- item 8: 80 columns


def test_results_list_and_show_print_ids_whole_at_80_columns(tmp_path, wide80):
    path = tmp_path / "v.duckdb"
    con = connect(path)
    runs = []
    for test, status in (("web_connectivity", "interrupted"), ("throttling", "store_failed")):
        run_id = R.new_id()
        long_url = "https://www.example.org/" + "a-long-path-segment/" * 6
        runner.start_run(con, run_id, runner.experiments("web" if test == "web_connectivity" else "throttling")[0],
                         [(long_url, "NEWS"), ("https://b.example/", None)], {}, runner.Location("IR", "AS4294967295"))
        record = web(long_url, run_id=run_id, queries=[q("www.example.org", IP)])
        write_all(con, [(record, "NEWS")])
        runner.finish_run(con, run_id, status)
        runs.append((run_id, record["measurement_id"]))
    con.close()
    listed = invoke("list", "--db", str(path))
    for run_id, _ in runs:
        assert run_id in listed
    for run_id, mid in runs:
        shown = invoke("show", run_id, "--db", str(path))
        assert run_id in shown and mid in shown
        assert "…" not in shown
        assert mid in invoke("show", mid, "--db", str(path))
    assert "…" not in listed
    assert max(len(line) for line in listed.splitlines()) <= 80


def test_run_summary_title_is_one_line_at_80_columns(capsys, wide80):
    from cli.run import _print_summary

    run_id = R.new_id()
    summary = runner.RunSummary(run_id=run_id, status="interrupted", measured=1234, total=10000,
                                outcomes=collections.Counter({"fetched": 1000, "dns failure": 234}), seconds=3723.4)
    _print_summary([summary], as_json=False, db_file="v.duckdb")
    lines = capsys.readouterr().out.splitlines()
    [title] = [line for line in lines if run_id in line]
    assert "interrupted" in title and "1234/10000 measured in 3723.4 s" in title


def test_progress_keeps_bar_count_and_time_with_six_outcome_kinds_at_80_columns(capsys, wide80):
    from cli.run import _Progress

    labels = ["fetched", "dns failure", "tcp failure", "tls failure", "http failure", "no network", "fetched"]
    with _Progress(10, "web_connectivity", quiet=False) as advance:
        for label in labels:
            advance("https://a.example/", label)
    err = capsys.readouterr().err
    assert max(len(line) for line in err.splitlines()) <= 80
    [bar] = [line for line in err.splitlines() if line.startswith("web_connectivity")]
    assert "━" in bar and "7/10" in bar and re.search(r"\d:\d\d:\d\d", bar), err
    flat = " ".join(err.split())
    for label, count in collections.Counter(labels).items():
        assert f"{label}: {count}" in flat, err


def test_error_lines_escape_what_they_quote(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    evil = "\x1b]0;pwned\x07\x9b2J.csv"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "lists", "show", "--list", evil], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert proc.returncode == 2
    assert_inert(proc.stderr)
    assert "\\x1b]0;pwned\\x07\\x9b2J.csv" in proc.stderr and proc.stderr.count("\n") == 1


def test_import_summary_escapes_the_test_versions_it_counts(tmp_path, wide80):
    """OONI's test_version is the file's text: the summary prints it escaped."""
    from cli.main import cli

    record = {"test_name": "web_connectivity", "test_version": "0.4.3" + EVIL, "report_id": "evil1",
              "input": "http://a.example/", "measurement_start_time": "2024-01-02 03:04:05", "probe_cc": "IR",
              "probe_asn": "AS1", "test_keys": None}
    path = tmp_path / "evil.jsonl"
    path.write_text(json.dumps(record) + "\n")
    result = CliRunner().invoke(cli, ["import", "ooni", "--db", str(tmp_path / "v.duckdb"), "--quiet", str(path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_inert(result.output)
    text = result.output.replace("\n", "")  # rich wraps the line at 80 columns
    assert "imported: 1 web_connectivity measurements (versions 0.4.3\\x1b]0;pwned\\x07" in text
    assert "[bold red]x[/]" in text and ":smile:" in text  # shown literally, not as markup or emoji


def test_lab_table_and_its_notes_are_escaped_and_never_markup(capsys, wide80):
    from cli.lab import _print_table

    _print_table({"scenario": EVIL, "correct": 0, "total": 1, "seconds": 1.0, "errors": [EVIL_FAILURE + " [red]note[/]"],
                  "results": [{"correct": False, "url": EVIL_URL, "expected": {"status": "blocked", "method": EVIL},
                               "got": {"status": "ok", "confidence": 0.5}}]})
    out = capsys.readouterr().out
    assert_inert(out)
    text = out.replace("\n", "")
    assert "\\x1b]0;t\\x07generic_timeout_error [red]note[/]" in text and "[bold]" in text
