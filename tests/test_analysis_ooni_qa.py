"""The analysis against OONI's 50 Web Connectivity QA measurements.

Each file name is the emulated scenario (ground truth); the expected verdicts
are in wc05_qa_expected.csv (status may list alternatives with '|'; layer is
checked only for blocked verdicts that name one). Every case must hold: a
rule change that gets one of OONI's QA cases wrong is a regression.
"""

from __future__ import annotations

import csv
import json

import pytest

from analysis.engine import analyze
from probes.ooni_import import record_from_ooni
from probes.store import connect, write_all
from shared import shared_path

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def qa():
    folder = shared_path("data", "ooni", "ooni-data-wc05_qa")
    expected_csv = shared_path("data", "ooni", "wc05_qa_expected.csv")
    con = connect(":memory:")
    names, records = {}, []
    for path in sorted(folder.glob("*.json")):
        record = record_from_ooni(json.loads(path.read_text()))
        names[record["measurement_id"]] = path.stem
        records.append((record, None))
    write_all(con, records)
    analyze(con, fingerprints_dir=shared_path("data", "fingerprints"))
    expected = {row["scenario"]: row for row in csv.DictReader(expected_csv.open())}
    cursor = con.execute("SELECT measurement_id, status, layer, method FROM verdicts")
    columns = [d[0] for d in cursor.description]
    got = {}
    for values in cursor.fetchall():
        row = dict(zip(columns, values))
        got[names[row.pop("measurement_id")]] = row
    return expected, got


def _correct(expected: dict, got: dict) -> bool:
    if got["status"] not in expected["status"].split("|"):
        return False
    return not (got["status"] == "blocked" and expected["layer"]) or got["layer"] == expected["layer"]


def test_every_measurement_gets_one_verdict(qa):
    expected, got = qa
    assert len(expected) == 50
    assert set(got) == set(expected)


def test_score(qa):
    expected, got = qa
    wrong = {name: (expected[name]["status"], expected[name]["layer"], got[name]) for name in expected
             if not _correct(expected[name], got[name])}
    assert not wrong, wrong


@pytest.mark.parametrize("name", ["websiteDownNXDOMAIN", "websiteDownTCPConnect", "badSSLWithExpiredCertificate",
                                  "localhostWithHTTPS", "controlFailureWithSuccessfulHTTPWebsite",
                                  "dnsHijackingToProxyWithHTTPSURL", "cloudflareCAPTCHAWithHTTPS"])
def test_never_called_censorship(qa, name):
    _, got = qa
    assert got[name]["status"] != "blocked"


def test_record_from_ooni_shape():
    raw = json.loads((shared_path("data", "ooni", "ooni-data-wc05_qa") / "dnsBlockingBOGON.json").read_text())
    record = record_from_ooni(raw)
    assert record["measurement_id"].startswith("ooni-")
    assert {q["engine"] for q in record["test_keys"]["queries"]} >= {"system", "udp", "doh"}
    assert raw["test_keys"]["queries"][2]["engine"] == "getaddrinfo"  # input untouched
    assert record["test_keys"]["requests"][0]["x_address"] == "93.184.216.34:443"
