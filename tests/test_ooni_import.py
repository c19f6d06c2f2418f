"""`vantage import ooni`: OONI's files into our tables (probes/ooni_import.py, cli/imports.py).

The 50 QA measurements through the CLI score as the analysis test expects;
every Web Connectivity measurement of the shared folder imports; a directory
in OONI's published layout with a corrupt line and a truncated .gz keeps
every good measurement and reports the bad ones with file and line (exit 3).
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from analysis.engine import analyze
from cli.main import cli
from probes.ooni_import import import_ooni, iter_documents, record_from_ooni
from probes.store import connect
from shared import shared_path
from test_analysis_ooni_qa import _correct

pytestmark = pytest.mark.shared

PARTIAL = 3  # cli/imports.py PARTIAL_EXIT


def _import(db: Path, *paths, json_out: bool = True):
    args = ["import", "ooni", "--db", str(db), "--quiet"] + (["--json"] if json_out else []) + [str(p) for p in paths]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _count(db: Path, table: str = "measurements") -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def _qa_lines(copies: int = 1) -> list[dict]:
    """The QA measurements, ``copies`` times, each copy with distinct report ids."""
    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    raws = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    out = []
    for n in range(copies):
        for raw in raws:
            raw = dict(raw, report_id=f"copy{n}_{raw.get('report_id') or ''}")
            raw.pop("measurement_uid", None)
            out.append(raw)
    return out


# --- the QA measurements, through the CLI --------------------------------------


def test_qa_measurements_import_through_the_cli_and_score(tmp_path):
    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    db = tmp_path / "v.duckdb"
    result = _import(db, folder)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["imported"], summary["bad"], summary["partial"]) == (50, 0, False)
    assert summary["versions"] == {"0.5.28": 50}

    names = {record_from_ooni(json.loads(p.read_text()))["measurement_id"]: p.stem for p in folder.glob("*.json")}
    con = connect(db)
    analyze(con, fingerprints_dir=shared_path("data", "fingerprints"))
    expected = {row["scenario"]: row for row in csv.DictReader(shared_path("data", "ooni", "wc05_qa_expected.csv").open())}
    got = {names[mid]: {"status": s, "layer": l} for mid, s, l in con.execute("SELECT measurement_id, status, layer FROM verdicts").fetchall()}
    assert set(got) == set(expected)
    wrong = {n: got[n] for n in expected if not _correct(expected[n], got[n])}
    assert not wrong, wrong
    # OONI's own verdict is kept beside ours, and the comparison view reads it.
    blocking = dict(con.execute("SELECT measurement_id, ooni_blocking FROM measurements").fetchall())
    raw = {record_from_ooni(json.loads(p.read_text()))["measurement_id"]: json.loads(p.read_text())["test_keys"]
           for p in folder.glob("*.json")}
    for mid, keys in raw.items():
        want = keys.get("blocking")
        assert blocking[mid] == (None if want is None else str(want).lower())
    with_verdict = sum(1 for keys in raw.values() if keys.get("blocking") is not None or keys.get("accessible") is not None)
    assert con.execute("SELECT count(*) FROM ooni_comparison").fetchone()[0] == with_verdict >= 45
    kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM ooni_disagreements").fetchall()}
    assert kinds <= {"ooni_blocked", "we_blocked", "layer"}
    con.close()


def test_importing_twice_adds_nothing(tmp_path):
    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    db = tmp_path / "v.duckdb"
    assert _import(db, folder).exit_code == 0
    counts = {t: _count(db, t) for t in ("measurements", "dns_answers", "tcp_connects", "tls_handshakes", "http_transactions")}
    again = _import(db, folder)
    assert again.exit_code == 0
    summary = json.loads(again.stdout)
    assert (summary["imported"], summary["duplicates"]) == (0, 50)
    assert {t: _count(db, t) for t in counts} == counts


# --- every real Web Connectivity measurement of the shared folder ---------------


def _web_connectivity_ids(root: Path) -> set[str]:
    """Independently of the importer's walk: every web_connectivity document
    with test keys in every file of the folder."""
    ids = set()
    for path in root.rglob("*"):
        if not path.is_file() or not path.name.endswith((".json", ".jsonl", ".jsonc", ".jsonl.gz")):
            continue
        for _line, doc in iter_documents(path):
            if isinstance(doc, dict) and doc.get("test_name") == "web_connectivity" and "test_keys" in doc:
                ids.add(record_from_ooni(doc)["measurement_id"])
    return ids


def test_every_web_connectivity_measurement_of_the_shared_folder_imports(tmp_path):
    root = shared_path("data", "ooni")
    db = tmp_path / "v.duckdb"
    result = _import(db, root)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    want = _web_connectivity_ids(root)
    assert len(want) >= 70
    con = duckdb.connect(str(db), read_only=True)
    got = {mid for (mid,) in con.execute("SELECT measurement_id FROM measurements").fetchall()}
    assert got == want
    # older versions too, and the other tests are counted by name
    assert {"0.4.1", "0.4.3", "0.5.26", "0.5.28"} <= set(summary["versions"])
    assert summary["skipped"]["tor"] >= 1 and summary["skipped"]["signal"] >= 1
    # the odd ones: base64 bodies (broken, too), header lists, null test keys
    def mid(name):
        return record_from_ooni(json.loads((root / "backend-fastpath" / name).read_text()))["measurement_id"]

    for name in ("web_connectivity_b64_hdr.json", "web_connectivity_b64_incorrect.json"):
        bodies = con.execute("SELECT body_length FROM http_transactions WHERE measurement_id = ? AND side = 'probe'",
                             [mid(name)]).fetchall()
        assert bodies and all(n is not None for (n,) in bodies), name
    for name in ("test_keys_none.json", "web_connectivity_null.json", "requests_none.json"):
        assert con.execute("SELECT count(*) FROM measurements WHERE measurement_id = ?", [mid(name)]).fetchone()[0] == 1
    con.close()


def test_odd_records_degrade_a_field_not_the_measurement(tmp_path):
    odd = [
        {"test_name": "web_connectivity", "test_version": "0.4.3", "report_id": "odd1", "input": "http://a.example/",
         "measurement_start_time": "2024-01-02 03:04:05", "probe_cc": "IR", "probe_asn": "AS1", "test_keys": None},
        {"test_name": "web_connectivity", "test_version": "0.5.28", "report_id": "odd2", "input": "https://b.example/",
         "measurement_start_time": "not a time", "probe_cc": 7, "probe_asn": 1234,
         "test_keys": {"queries": "nope", "tcp_connect": [{"ip": "1.2.3.4", "port": "https", "status": {"success": "yes"}}, 3],
                       "requests": [{"request": {"url": "https://b.example/"},
                                     "response": {"code": "200", "body": {"format": "base64", "data": "PHRpdGxlPkhpPC90aXRsZT4"},
                                                  "headers_list": [["Server", "x"]], "headers": {"Server": "x"}}}],
                       "blocking": False, "accessible": True}},
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in odd))
    con = connect(tmp_path / "v.duckdb")
    summary = import_ooni(con, [path])
    assert (summary.imported, summary.bad) == (2, 0)
    row = con.execute("SELECT title, status_code, body FROM http_transactions").fetchone()
    assert row == ("Hi", 200, "<title>Hi</title>")
    assert con.execute("SELECT port FROM tcp_connects").fetchall() == [(None,)]
    assert con.execute("SELECT ooni_blocking, ooni_accessible FROM measurements WHERE run_id = 'odd2'").fetchone() == ("false", True)


def test_binary_header_values_are_stored_as_text(tmp_path):
    """OONI writes a header value that is not UTF-8 as a base64 object
    (df-001 MaybeBinaryData): it is stored as text, so the rules that read
    a Location or a Server header see it."""
    import base64

    location = "http://blocked.example/\xff".encode("latin-1")
    doc = {"test_name": "web_connectivity", "test_version": "0.4.3", "report_id": "bin1", "input": "http://c.example/",
           "measurement_start_time": "2024-01-02 03:04:05",
           "test_keys": {"requests": [{"request": {"url": "http://c.example/"},
                                       "response": {"code": 302, "body": "",
                                                    "headers": {"Location": {"format": "base64",
                                                                             "data": base64.b64encode(location).decode()},
                                                                "Server": "x"}}}]}}
    path = tmp_path / "bin.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    con = connect(tmp_path / "v.duckdb")
    assert import_ooni(con, [path]).imported == 1
    row = con.execute("SELECT json_extract_string(headers, '$.Location'), json_extract_string(headers, '$.Server') "
                      "FROM http_transactions").fetchone()
    assert row == ("http://blocked.example/\ufffd", "x")


# --- a published layout with a corrupt line and a truncated .gz -----------------


def _write_gz(path: Path, docs: list, corrupt_line: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d) for d in docs]
    if corrupt_line is not None:
        lines.insert(corrupt_line - 1, '{"test_name": "web_connectivity", "test_keys": {"queries": [')
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def test_published_layout_with_a_corrupt_line_and_a_truncated_gz(tmp_path):
    docs = _qa_lines(copies=3)
    day = tmp_path / "raw" / "20240102"
    good = day / "00" / "IR" / "webconnectivity" / "2024010200_IR_webconnectivity.n0.0.jsonl.gz"
    _write_gz(good, docs[:50], corrupt_line=7)
    truncated = day / "01" / "IR" / "webconnectivity" / "2024010201_IR_webconnectivity.n0.0.jsonl.gz"
    _write_gz(truncated, docs[50:150])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other = day / "00" / "IR" / "telegram" / "2024010200_IR_telegram.n0.0.jsonl.gz"
    _write_gz(other, [{"test_name": "telegram", "test_keys": {}, "report_id": "t", "input": None}] * 4)
    plain = day / "02" / "IR" / "webconnectivity" / "one.json"
    plain.parent.mkdir(parents=True)
    plain.write_text(json.dumps(docs[0] | {"report_id": "plain"}))

    # what is readable of the truncated file: its complete lines
    readable = zlib.decompressobj(31).decompress(truncated.read_bytes())
    complete = readable.count(b"\n")
    assert 0 < complete < 100

    db = tmp_path / "v.duckdb"
    result = _import(db, tmp_path / "raw")
    assert result.exit_code == PARTIAL, result.output
    summary = json.loads(result.stdout)
    assert summary["partial"] is True
    assert summary["skipped"] == {"telegram": 4}
    errors = {(Path(e["file"]).name, e["line"]) for e in summary["errors"]}
    assert errors == {(good.name, 7), (truncated.name, complete + 1)}
    assert f"{good}:7: not JSON" in result.stderr
    assert f"{truncated}:{complete + 1}: truncated or corrupt gzip stream" in result.stderr
    assert "partial import" in result.stderr

    want = {record_from_ooni(d)["measurement_id"] for d in docs[:50] + docs[50:50 + complete]}
    want.add(record_from_ooni(docs[0] | {"report_id": "plain"})["measurement_id"])
    con = duckdb.connect(str(db), read_only=True)
    got = {mid for (mid,) in con.execute("SELECT measurement_id FROM measurements").fetchall()}
    con.close()
    assert got == want
    assert summary["imported"] == len(want)


def test_a_missing_path_is_one_line_exit_2(tmp_path):
    from cli.main import main
    import sys

    argv = sys.argv
    sys.argv = ["vantage", "import", "ooni", "--db", str(tmp_path / "v.duckdb"), str(tmp_path / "nope")]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = argv
    assert exit_.value.code == 2
