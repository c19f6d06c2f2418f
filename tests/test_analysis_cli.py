"""`vantage analyze`, `vantage fingerprints`, and analysis.explain."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.analyze import analyze, fingerprints
from analysis.explain import describe
from analysis_fixtures import FINGERPRINTS, control, http, page, q, tcp, tls, web
from probes.store import connect, write_all

IP = "198.18.0.10"


def _db(tmp_path):
    path = tmp_path / "v.duckdb"
    con = connect(path)
    ok = web("https://a.example/", queries=[q("a.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "a.example")],
             requests=[http("https://a.example/", IP, body=page("A"))], ctl=control(addrs=(IP,), body=page("A"), title="A"))
    nx = web("https://b.example/", queries=[q("b.example", failure="dns_nxdomain_error")], ctl=control(addrs=(IP,)))
    write_all(con, [(ok, None), (nx, None)])
    con.close()
    return path


def test_analyze_json(tmp_path):
    result = CliRunner().invoke(analyze, ["--db", str(_db(tmp_path)), "--public-network", "198.18.0.0/15",
                                          "--fingerprints-dir", str(FINGERPRINTS), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["analysed"] == 2
    assert {(r["status"], r["method"]) for r in out["verdicts"]} == {("ok", None), ("blocked", "dns.nxdomain")}


def test_analyze_table(tmp_path):
    result = CliRunner().invoke(analyze, ["--db", str(_db(tmp_path)), "--public-network", "198.18.0.0/15"])
    assert result.exit_code == 0
    assert "dns.nxdomain" in result.output


def test_bad_cidr_is_one_line(tmp_path):
    from cli.main import cli

    result = CliRunner().invoke(cli, ["analyze", "--db", str(_db(tmp_path)), "--public-network", "nonsense"],
                                standalone_mode=False)
    assert "not a network in CIDR form" in str(result.exception)


def test_fingerprints_group_has_update():
    assert "update" in fingerprints.commands


def test_describe():
    text = describe({"status": "blocked", "method": "tcp.reset", "confidence": 0.85, "confirmed": False,
                     "evidence": json.dumps({"rule": "tcp_refused", "compared": {"endpoint": "1.2.3.4:80"}})})
    assert "1.2.3.4:80" in text and "refused" in text
    assert "offline" in describe({"status": "inconclusive", "evidence": {"rule": "probe_offline", "compared": {"evidence": "probe offline"}}})
    assert describe({"status": "down", "evidence": {}}).startswith("The site was unreachable")
