"""The analysis over every real OONI Web Connectivity measurement in the shared folder.

The sources: ``backend-fastpath/`` (the fixtures of OONI's backend, including
malformed ones: broken base64, null test keys), ``probe-cli/`` (the fixtures
of ooniprobe's minipipeline, one of them test keys only, as ``.jsonc``) and
the 50 QA measurements. Each is converted with ``probes.ooni_import`` and
stored with ``probes.store.write_all`` (not ``vantage import ooni``: this test
is about the analysis). Every one must get exactly one verdict, none of them
from a crash; docs/ooni.md ("Our verdicts on OONI's real measurements") has the
table this test prints with ``-s``.

Files that hold no measurement are not measurements: fastpath's query
listings (``detector_query_ww_BR_2018.json``, ``oonirun-measurements.json``)
are rows of OONI's metadata table, without test keys; other test names
(tor, signal, ...) are not Web Connectivity.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from analysis.engine import analyze
from probes.ooni_import import record_from_ooni
from probes.store import connect, write_all
from shared import shared_path

pytestmark = pytest.mark.shared

_UID = re.compile(r"explorer\.ooni\.org/m/(\S+)")


def _load(path: Path) -> list[dict]:
    """The web_connectivity measurements of one file (JSON, or ooniprobe's
    ``.jsonc``: ``//`` comment lines, and possibly test keys alone)."""
    text = path.read_text(encoding="utf-8")
    uid = None
    if path.suffix == ".jsonc":
        comments = [line for line in text.splitlines() if line.lstrip().startswith("//")]
        uid = next((m.group(1) for line in comments for m in [_UID.search(line)] if m), None)
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = data if isinstance(data, list) else [data]
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if "test_keys" not in item and "queries" in item and "requests" in item:
            # test keys alone: the envelope is rebuilt from what they say
            asked = ((item.get("x_control_request") or {}).get("http_request")
                     if isinstance(item.get("x_control_request"), dict) else None)
            item = {"test_name": "web_connectivity", "measurement_uid": uid, "input": asked, "test_keys": item}
        if item.get("test_name") == "web_connectivity" and "test_keys" in item:
            out.append(item)
    return out


def real_measurements() -> list[tuple[str, dict]]:
    """(file name relative to data/ooni, raw measurement) for every real one."""
    root = shared_path("data", "ooni")
    files = sorted(p for sub in ("backend-fastpath", "probe-cli") for p in (root / sub).rglob("*")
                   if p.is_file() and (p.suffix in (".json", ".jsonc") or p.name.endswith(".json.pretty")))
    files += sorted((root / "ooni-data-wc05_qa").glob("*.json"))
    found = []
    for path in files:
        for raw in _load(path):
            found.append((str(path.relative_to(root)), raw))
    return found


def ooni_blocking(raw: dict) -> str:
    keys = raw.get("test_keys")
    if not isinstance(keys, dict):
        return "(no test keys)"
    value = keys.get("blocking")
    return "null" if value is None else str(value).lower()


@pytest.fixture(scope="module")
def analysed():
    found = real_measurements()
    con = connect(":memory:")
    names: dict[str, list[str]] = {}
    records = []
    for name, raw in found:
        record = record_from_ooni(raw)
        mid = record["measurement_id"]
        if mid not in names:
            records.append((record, None))
        names.setdefault(mid, []).append(name)
    write_all(con, records)
    analyze(con, fingerprints_dir=shared_path("data", "fingerprints"))
    rows = con.execute("SELECT measurement_id, status, layer, method, evidence->>'rule' FROM verdicts").fetchall()
    return found, names, con, rows


def test_every_real_measurement_gets_one_verdict(analysed):
    found, names, con, rows = analysed
    assert len(found) >= 70  # 17 fastpath files, 8 probe-cli, 50 QA
    stored = {r[0] for r in con.execute("SELECT measurement_id FROM measurements").fetchall()}
    assert stored == set(names), "a measurement was lost on import"
    got = [r[0] for r in rows]
    assert sorted(got) == sorted(names), "not exactly one verdict per measurement"
    assert all(status for _mid, status, *_ in rows)


def test_youtube_from_an_ipv4_only_probe_is_ok(analysed):
    found, names, con, rows = analysed
    by_name = {name: row for row in rows for name in names[row[0]]}
    status, layer, method, rule = by_name["probe-cli/minipipeline-manual/noipv6.measurement.json"][1:]
    assert status == "ok", (status, method, rule)


def test_broken_base64_body_is_one_field_not_the_measurement(analysed):
    found, names, con, rows = analysed
    by_name = {name: row for row in rows for name in names[row[0]]}
    assert "backend-fastpath/web_connectivity_b64_incorrect.json" in by_name


def test_table(analysed, capsys):
    """The table of docs/ooni.md: one row per measurement (printed when
    VANTAGE_PRINT_OONI_TABLE=1)."""
    found, names, con, rows = analysed
    raw_by_name = dict(found)
    by_mid = {r[0]: r for r in rows}
    lines = ["| measurement | input | OONI `blocking` | our verdict | rule |", "|---|---|---|---|---|"]
    for mid, files in sorted(names.items(), key=lambda kv: kv[1][0]):
        _mid, status, layer, method, rule = by_mid[mid]
        raw = raw_by_name[files[0]]
        verdict = status + (f" {method}" if method else "")
        lines.append(f"| {' = '.join(f'`{f}`' for f in files)} | {raw.get('input')} | {ooni_blocking(raw)} | {verdict} | `{rule}` |")
    assert len(lines) == 2 + len(names)
    if os.environ.get("VANTAGE_PRINT_OONI_TABLE") == "1":
        with capsys.disabled():
            print("\n" + "\n".join(lines))
