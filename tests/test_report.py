"""Country reports (analysis/report): the figures of a report against the
verdicts of a database with known censorship.

The database: country ZZ, ten days (1–10 March 2025), two large networks
with two vantage points each and a small one with a single vantage point;
every site measured twice a day per network (once per vantage point), built
with tests/analysis_fixtures.py and judged by the real analyze():

| site | category | AS64500 | AS64501 |
|---|---|---|---|
| news.example | NEWS | DNS NXDOMAIN from 4 March (started) | ok |
| rights.example | HUMR | TCP refused until 6 March, then ok (stopped 7 March) | ok |
| party.example | POLR | ok | blockpage, fingerprint match (confirmed) every day |
| chat.example | COMT | ok | TLS reset every day |
| shop.example | COMM | ok | ok |
| video.example | MMED | throttled (SNI) every day | — |
| weak.example | GRP | one odd page on 6 March (too little data) | — |

AS64502 (one vantage point) saw news.example NXDOMAIN twice on 10 March:
too little data, and a network too small to compare.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest

from analysis_fixtures import control, http, page, q, tcp, throttling, tls, web

START = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc).timestamp()
DAYS = 10
NEWS = page("Daily News", 20000)
BLOCKPAGE = "<html><head><title>Blocked</title></head><body>Access to this resource has been restricted by decision of the regulator.</body></html>"


def day(i: int) -> dt.date:
    return dt.date(2025, 3, 1) + dt.timedelta(days=i)


def ok_site(host: str, ip: str = "198.18.0.10", **kw) -> dict:
    return web(f"https://{host}/", queries=[q(host, ip)], tcps=[tcp(ip)], tlss=[tls(ip, host)],
               requests=[http(f"https://{host}/", ip, body=NEWS)], ctl=control(addrs=(ip,), body=NEWS, title="Daily News"), **kw)


def nxdomain(host: str, **kw) -> dict:
    return web(f"https://{host}/", queries=[q(host, failure="dns_nxdomain_error")],
               ctl=control(addrs=("198.18.0.10",), body=NEWS, title="Daily News"), **kw)


def refused(host: str, ip: str = "198.18.0.10", **kw) -> dict:
    return web(f"https://{host}/", queries=[q(host, ip)], tcps=[tcp(ip, 443, "connection_refused")],
               ctl=control(addrs=(ip,), body=NEWS, title="Daily News"), **kw)


def tls_reset(host: str, ip: str = "198.18.0.10", **kw) -> dict:
    return web(f"https://{host}/", queries=[q(host, ip)], tcps=[tcp(ip)], tlss=[tls(ip, host, failure="connection_reset")],
               requests=[http(f"https://{host}/", None, status=None, body=None, failure="connection_reset")],
               ctl=control(addrs=(ip,), body=NEWS, title="Daily News"), **kw)


def blockpage(host: str, ip: str = "198.18.0.10", body: str = BLOCKPAGE, headers: dict | None = None, **kw) -> dict:
    return web(f"http://{host}/", queries=[q(host, ip)], tcps=[tcp(ip, 80)],
               requests=[http(f"http://{host}/", ip, body=body, headers=headers)],
               ctl=control(addrs=(ip,), port=80, body=page("Party", 30000), title="Party"), **kw)


def ok_http(host: str, ip: str = "198.18.0.10", **kw) -> dict:
    return web(f"http://{host}/", queries=[q(host, ip)], tcps=[tcp(ip, 80)], requests=[http(f"http://{host}/", ip, body=NEWS)],
               ctl=control(addrs=(ip,), port=80, body=NEWS, title="Daily News"), **kw)


def odd_page(host: str, ip: str = "198.18.0.10", **kw) -> dict:
    return web(f"http://{host}/", queries=[q(host, ip)], tcps=[tcp(ip, 80)],
               requests=[http(f"http://{host}/", ip, body=page("Something else", 300))],
               ctl=control(addrs=(ip,), port=80, body=NEWS, title="Daily News"), **kw)


def throttled(host: str, *, run_id: str, started: float, cc: str, asn: str) -> dict:
    record = throttling(f"https://{host}/", 120, 9000, 9500, run_id=run_id)
    record.update(probe_cc=cc, probe_asn=asn,
                  measurement_start_time=dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
    return record


def fingerprints(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "blockpage_signatures.json").write_text('{"fingerprint": "t_regulator", "pattern": "restricted by decision of the regulator"}\n')
    (folder / "false_positive_signatures.json").write_text('{"fingerprint": "fp_nginx", "pattern": "Welcome to nginx"}\n')
    return folder


def plan() -> list[tuple[dict, str]]:
    """(record, category) for the whole scenario of the module docstring."""
    out = []
    for i in range(DAYS):
        for vp in range(2):
            for asn in ("AS64500", "AS64501"):
                kw = dict(run_id=f"{asn}-vp{vp}", started=START + i * 86400 + 3600 * (6 + vp * 6), cc="ZZ", asn=asn)
                a = asn == "AS64500"
                out.append((nxdomain("news.example", **kw) if a and i >= 3 else ok_site("news.example", **kw), "NEWS"))
                out.append((refused("rights.example", **kw) if a and i <= 5 else ok_site("rights.example", **kw), "HUMR"))
                out.append((blockpage("party.example", **kw) if not a else ok_site("party.example", **kw), "POLR"))
                out.append((tls_reset("chat.example", **kw) if not a else ok_site("chat.example", **kw), "COMT"))
                out.append((ok_site("shop.example", **kw), "COMM"))
                if a:
                    out.append((throttled("video.example", **kw), "MMED"))
                    out.append((odd_page("weak.example", **kw) if i == 5 and vp == 0 else ok_http("weak.example", **kw), "GRP"))
    for vp_time in (1, 2):
        kw = dict(run_id="AS64502-vp0", started=START + 9 * 86400 + 3600 * vp_time, cc="ZZ", asn="AS64502")
        out.append((nxdomain("news.example", **kw), "NEWS"))
    # Another country's measurement, which no ZZ report may count.
    out.append((nxdomain("news.example", run_id="other", started=START, cc="YY", asn="AS64999"), "NEWS"))
    return out


def make_database(path: Path, fp_dir: Path, records: list[tuple[dict, str]] | None = None) -> None:
    from analysis.engine import analyze
    from probes.store import connect, write_all

    con = connect(str(path))
    try:
        write_all(con, records if records is not None else plan())
        analyze(con, fingerprints_dir=fp_dir, public_networks=["198.18.0.0/15"])
    finally:
        con.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report-db")
    path = folder / "vantage.duckdb"
    make_database(path, fingerprints(folder / "fingerprints"))
    return path


@pytest.fixture(scope="module")
def report(db, tmp_path_factory):
    from analysis.db import connect
    from analysis.report import build

    out = tmp_path_factory.mktemp("report") / "zz"
    con = connect(db)
    try:
        result = build(con, country="zz", out_dir=out, generated_at=dt.datetime(2025, 3, 11, tzinfo=dt.timezone.utc))
    finally:
        con.close()
    return result, out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def verdict_counts(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def findings_by_key(out: Path) -> dict[tuple, dict]:
    return {(f["domain"], f["asn"], f["method"]): f for f in read_csv(out / "data" / "findings.csv")}


def test_overview_counts_match_the_database(db, report):
    result, out = report
    assert result.country == "ZZ"
    (total,) = verdict_counts(db, "SELECT count(*) FROM measurements WHERE probe_cc = 'ZZ'")[0]
    assert result.measurements == total == 242  # the YY measurement is not counted
    assert result.networks == 3 and result.unanalysed == 0
    networks = {n["asn"]: n for n in read_csv(out / "data" / "networks.csv")}
    assert {a: int(n["vantage_points"]) for a, n in networks.items()} == {"AS64500": 2, "AS64501": 2, "AS64502": 1}
    assert {a: int(n["measurements"]) for a, n in networks.items()} == {"AS64500": 140, "AS64501": 100, "AS64502": 2}
    rows = read_csv(out / "data" / "verdicts.csv")
    assert len(rows) == total
    assert {r["measurement_id"] for r in rows} == {m for (m,) in verdict_counts(
        db, "SELECT measurement_id FROM measurements WHERE probe_cc = 'ZZ'")}


def test_each_finding_counts_its_verdicts(db, report):
    result, out = report
    found = findings_by_key(out)
    expected = {  # (domain, asn, method): (n, usable, confirmed, supported, first day, last day)
        ("party.example", "AS64501", "http.blockpage"): (20, 20, "true", "true", "2025-03-01", "2025-03-10"),
        ("chat.example", "AS64501", "tls.reset"): (20, 20, "false", "true", "2025-03-01", "2025-03-10"),
        ("news.example", "AS64500", "dns.nxdomain"): (14, 20, "false", "true", "2025-03-04", "2025-03-10"),
        ("rights.example", "AS64500", "tcp.reset"): (12, 20, "false", "true", "2025-03-01", "2025-03-06"),
        ("video.example", "AS64500", "throttle.sni"): (20, 20, "false", "true", "2025-03-01", "2025-03-10"),
        ("weak.example", "AS64500", "http.diff"): (1, 20, "false", "false", "2025-03-06", "2025-03-06"),
        ("news.example", "AS64502", "dns.nxdomain"): (2, 2, "false", "false", "2025-03-10", "2025-03-10"),
    }
    assert {k: (int(f["n"]), int(f["usable"]), f["confirmed"], f["supported"], f["first_day"], f["last_day"])
            for k, f in found.items()} == expected
    assert result.findings == {"confirmed": 1, "anomaly": 4, "weak": 2}
    # Every finding's measurement ids are exactly the verdicts behind it.
    ids: dict[str, set] = {}
    for r in read_csv(out / "data" / "finding_measurements.csv"):
        ids.setdefault(r["finding_id"], set()).add(r["measurement_id"])
    for (domain, asn, method), f in found.items():
        truth = {m for (m,) in verdict_counts(db, f"""
            SELECT measurement_id FROM verdicts JOIN measurements USING (measurement_id)
            WHERE domain = '{domain}' AND probe_asn = '{asn}' AND method = '{method}'""")}
        assert ids[f["finding_id"]] == truth, (domain, asn, method)
        assert len(truth) == int(f["n"])


def test_change_points_are_the_days_blocking_started_and_stopped(report):
    result, out = report
    changes = [(c["domain"], c["asn"], c["change"], c["day"], c["last_before"]) for c in read_csv(out / "data" / "changepoints.csv")]
    assert changes == [("news.example", "AS64500", "started", "2025-03-04", "2025-03-03"),
                       ("rights.example", "AS64500", "stopped", "2025-03-07", "2025-03-06")]
    assert result.changes == 2
    # weak.example's single odd day is noise (a run shorter than the minimum): no change point.
    days = [d for d in read_csv(out / "data" / "site_days.csv") if d["input"] == "http://weak.example/"]
    assert [d["day"] for d in days if d["blocked"] == "true"] == ["2025-03-06"]


def test_method_breakdown_matches_the_verdicts(db, report):
    _, out = report
    got = {(r["asn"], r["method"]): (r["family"], int(r["measurements"]), int(r["confirmed"]))
           for r in read_csv(out / "data" / "methods.csv")}
    truth = {(asn, method): n for asn, method, n in verdict_counts(db, """
        SELECT probe_asn, method, count(*) FROM verdicts JOIN measurements USING (measurement_id)
        WHERE probe_cc = 'ZZ' AND status IN ('blocked', 'throttled') GROUP BY ALL""")}
    assert {k: v[1] for k, v in got.items()} == truth
    assert got == {("AS64500", "dns.nxdomain"): ("dns", 14, 0), ("AS64500", "tcp.reset"): ("tcp", 12, 0),
                   ("AS64500", "http.diff"): ("http", 1, 0), ("AS64500", "throttle.sni"): ("throttling", 20, 0),
                   ("AS64501", "http.blockpage"): ("http", 20, 20), ("AS64501", "tls.reset"): ("tls", 20, 0),
                   ("AS64502", "dns.nxdomain"): ("dns", 2, 0)}


def test_throttling_slowdown_from_the_timed_downloads(report):
    _, out = report
    (t,) = read_csv(out / "data" / "throttling.csv")
    assert (t["domain"], t["asn"], t["method"]) == ("video.example", "AS64500", "throttle.sni")
    assert (float(t["target_kbit"]), float(t["scrambled_kbit"]), float(t["slowdown"])) == (120.0, 9000.0, 75.0)
    assert "75.0× slower" in (out / "index.html").read_text(encoding="utf-8")


def test_timeline_rates_and_what_is_charted(report):
    _, out = report
    points = {(p["asn"], p["day"]): p for p in read_csv(out / "data" / "timeline.csv")}
    # AS64500 on 6 March: rights (2), video (2), news (2) and weak (1) of 14 usable.
    p = points[("AS64500", "2025-03-06")]
    assert (int(p["usable"]), int(p["anomaly"]), float(p["anomaly_rate"]), p["charted"]) == (14, 7, 0.5, "true")
    # AS64502 has 2 measurements on one day: not charted.
    assert points[("AS64502", "2025-03-10")]["charted"] == "false"


def test_html_is_self_contained_and_says_what_it_found(report):
    _, out = report
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert "<script" not in html.lower() and "<link" not in html.lower() and "@import" not in html
    assert " src=" not in html  # no image, frame or script source of any kind
    assert html.count("<svg") == 3  # timeline, methods, throttling, inlined
    for name in ("timeline", "methods", "throttling"):
        svg = (out / f"{name}.svg").read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "<svg" in svg and "<script" not in svg
    assert "14 of 20 usable measurements of this URL on AS64500 between 2025-03-04 and 2025-03-10 (70%)" in html
    assert "a known censorship fingerprint matched, so this is confirmed" in html
    assert "2025-03-04</td><td>blocking started" in html and "2025-03-07</td><td>blocking stopped" in html
    assert "two-state run-length rule" in html and "at least 3 measured days" in html
    # Weak signals are in "Too little data", not among the findings.
    anomalies = html.split('id="anomalies"', 1)[1].split('id="categories"', 1)[0]
    thin = html.split('id="thin"', 1)[1].split('id="method"', 1)[0]
    assert "weak.example" not in anomalies and "weak.example" in thin
    assert "AS64502" in thin
    caveats = html.split('id="method"', 1)[1]
    assert "single vantage point" in caveats and "0.0% of the measurements were inconclusive" in caveats
    # Links only for http(s) URLs, and never followed automatically.
    assert 'href="https://news.example/" rel="nofollow noopener noreferrer"' in html


def test_markdown_has_the_same_findings(report):
    _, out = report
    md = (out / "report.md").read_text(encoding="utf-8")
    for f in read_csv(out / "data" / "findings.csv"):
        assert f["finding_id"] in md
    assert "14 of 20 usable measurements of this URL on AS64500" in md
    assert "| 2025-03-04 | blocking started | news.example | AS64500 |" in md
    assert "![Daily anomaly rate per network](timeline.svg)" in md


def test_parquet_holds_the_same_rows_as_csv(report):
    _, out = report
    con = duckdb.connect()
    for csv_path in (out / "data").glob("*.csv"):
        parquet = csv_path.with_suffix(".parquet")
        n_csv = con.execute("SELECT count(*) FROM read_csv_auto(?, header = true)", [str(csv_path)]).fetchone()[0] \
            if csv_path.stat().st_size > 0 and len(csv_path.read_text().splitlines()) > 1 else 0
        n_parquet = con.execute("SELECT count(*) FROM read_parquet(?)", [str(parquet)]).fetchone()[0]
        assert n_csv == n_parquet, csv_path.name


def test_scope_by_network_and_period(db, tmp_path):
    from analysis.db import connect
    from analysis.report import build

    con = connect(db)
    try:
        only = build(con, country="ZZ", asns=["64501"], out_dir=tmp_path / "a")
        late = build(con, country="ZZ", since=dt.date(2025, 3, 5), until=dt.date(2025, 3, 10), out_dir=tmp_path / "b")
    finally:
        con.close()
    assert (only.measurements, only.networks, only.findings) == (100, 1, {"confirmed": 1, "anomaly": 1, "weak": 0})
    assert only.changes == 0
    # From 5 March: news.example is blocked throughout (no change), rights.example's two blocked days are a run too short.
    assert late.measurements == 140 * 6 // 10 + 100 * 6 // 10 + 2
    assert late.changes == 0
    states = read_csv(tmp_path / "b" / "data" / "changepoints.csv")
    assert states == []


def test_missing_or_partial_verdicts_are_said_plainly(tmp_path):
    from analysis.db import connect
    from analysis.engine import analyze
    from analysis.report import ReportError, build
    from probes.store import connect as store_connect, write_all

    path = tmp_path / "v.duckdb"
    con = store_connect(str(path))
    write_all(con, [(ok_site("a.example", cc="ZZ", asn="AS1"), "NEWS")])
    con.close()
    con = connect(path)
    try:
        with pytest.raises(ReportError, match="run `vantage analyze` first"):
            build(con, country="ZZ", out_dir=tmp_path / "r")
        with pytest.raises(ReportError, match="no measurements for XX"):
            build(con, country="XX", out_dir=tmp_path / "r")
        with pytest.raises(ReportError, match="two-letter"):
            build(con, country="ZZZ", out_dir=tmp_path / "r")
        analyze(con, fingerprints_dir="/nonexistent", public_networks=["198.18.0.0/15"])
        write_all(con, [(ok_site("b.example", cc="ZZ", asn="AS1"), "NEWS")])
        result = build(con, country="ZZ", out_dir=tmp_path / "r")
    finally:
        con.close()
    assert result.unanalysed == 1
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert "Verdicts missing:" in html and "1 of 2 measurements" in html


def test_cli_writes_the_report_and_maps_errors(db, tmp_path):
    import subprocess
    import sys

    from click.testing import CliRunner

    from cli.report import report as report_command

    out = tmp_path / "cli"
    result = CliRunner().invoke(report_command, ["--country", "ZZ", "--out", str(out), "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["measurements"] == 242 and data["findings"]["confirmed"] == 1 and data["change_points"] == 2
    assert (out / "index.html").is_file() and (out / "data" / "findings.parquet").is_file()
    root = Path(__file__).resolve().parents[1]
    bad = subprocess.run([sys.executable, "-m", "cli.main", "report", "--country", "QQ", "--out", str(tmp_path / "x"),
                          "--db", str(db)], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and bad.stderr.startswith("vantage: no measurements for QQ"), bad.stderr
    missing = subprocess.run([sys.executable, "-m", "cli.main", "report", "--country", "ZZ", "--out", str(tmp_path / "x"),
                              "--db", str(tmp_path / "nope.duckdb")], capture_output=True, text=True, cwd=root)
    assert missing.returncode == 2 and "no database at" in missing.stderr


@pytest.mark.shared
def test_report_on_imported_ooni_measurements(tmp_path):
    from analysis.db import connect
    from analysis.report import build
    from probes.ooni_import import record_from_ooni
    from shared import shared_path

    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    records = [(record_from_ooni(json.loads(p.read_text())), None) for p in sorted(folder.glob("*.json"))]
    path = tmp_path / "ooni.duckdb"
    make_database(path, shared_path("data", "fingerprints"), records)
    con = connect(path)
    try:
        result = build(con, country="IT", out_dir=tmp_path / "it")
        truth = dict(con.execute("SELECT status, count(*) FROM verdicts GROUP BY ALL").fetchall())
    finally:
        con.close()
    assert result.measurements == 50 and result.networks == 1 and result.unanalysed == 0
    findings = read_csv(tmp_path / "it" / "data" / "findings.csv")
    assert sum(int(f["n"]) for f in findings) == truth.get("blocked", 0) + truth.get("throttled", 0) > 0
    html = (tmp_path / "it" / "index.html").read_text(encoding="utf-8")
    assert "AS137" in html and "ooniprobe web_connectivity (50)" in html


HOSTILE = "a$\\frac{$b"


def test_dollar_signs_in_labels_are_drawn_and_written_literally(tmp_path):
    """A domain, ASN and category with TeX in `$...$` (network text): the
    charts draw it without mathtext, the Markdown escapes every `$`."""
    from analysis.report import charts

    row = {"domain": f"{HOSTILE}.example", "asn": f"AS{HOSTILE}", "method": "throttle.sni",
           "scrambled_kbit": 9000, "control_kbit": 9500, "target_kbit": 120}
    assert "<svg" in charts.throttling([row])
    share = {"asn": f"AS{HOSTILE}", "usable": 4, "dns": 1, "tcp": 1, "tls": 0, "http": 0, "throttling": 1}
    assert "<svg" in charts.methods([share])
    point = {"asn": f"AS{HOSTILE}", "day": day(0), "anomaly_rate": 0.5, "charted": True}
    change = {"asn": f"AS{HOSTILE}", "day": day(0), "change": "started"}
    assert "<svg" in charts.timeline([point], [change], [f"AS{HOSTILE}"])

    records = []
    for i in range(DAYS):
        for vp in range(2):
            kw = dict(run_id=f"h-vp{vp}", started=START + i * 86400 + 3600 * (6 + vp * 6), cc="ZZ", asn=f"AS{HOSTILE}")
            records.append((nxdomain(f"{HOSTILE}.example", **kw) if i >= 3 else ok_site(f"{HOSTILE}.example", **kw), f"C{HOSTILE}"))
            records.append((throttled(f"v{HOSTILE}.example", **kw), f"M{HOSTILE}"))
    path = tmp_path / "hostile.duckdb"
    make_database(path, fingerprints(tmp_path / "fingerprints"), records)
    from analysis.db import connect
    from analysis.report import build

    con = connect(path)
    try:
        result = build(con, country="ZZ", out_dir=tmp_path / "r", generated_at=dt.datetime(2025, 3, 11, tzinfo=dt.timezone.utc))
    finally:
        con.close()
    assert result.measurements == len(records)
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "a\\$\\\\frac{\\$b.example" in md and "ASa\\$\\\\frac{\\$b" in md
    assert "$" not in md.replace("\\$", "")
    for svg in (tmp_path / "r").glob("*.svg"):
        assert "<svg" in svg.read_text(encoding="utf-8")
