"""Every shared lab scenario, end to end with the real probe, helper, censor and
analysis: it must score fully correct, fast, and each censor action must leave
its mark in the probe's raw observations and not in the control's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pytest

from rootonly import require_root
from shared import SHARED, shared_path

pytestmark = pytest.mark.lab

SCENARIOS = ("lab", "scenarios")


def _failure_mark(table: str, failure: str) -> str:
    """The probe's rows of ``table`` show ``failure``; the control's succeeded."""
    return f"""
        SELECT bool_or(side = 'probe' AND failure = '{failure}'), bool_or(side = 'control' AND success)
        FROM {table} JOIN measurements USING (measurement_id) WHERE domain = $d"""


# For each censor action: SQL over the probe database returning one row
# (probe_mark, control_clean) for the rule's domain ($d).
MARKS = {
    "dns-nxdomain": """
        SELECT bool_or(side = 'probe' AND failure = 'dns_nxdomain_error'),
               bool_or(side = 'control' AND answer IS NOT NULL)
        FROM dns_answers JOIN measurements USING (measurement_id) WHERE domain = $d""",
    "dns-redirect": """
        SELECT bool_or(side = 'probe' AND engine = 'system' AND answer = $answer),
               NOT bool_or(side = 'control' AND answer = $answer) AND bool_or(side = 'control' AND answer IS NOT NULL)
        FROM dns_answers JOIN measurements USING (measurement_id) WHERE domain = $d""",
    "dns-inject": """
        -- the forged answer first, the genuine one later, on the same query
        SELECT bool_or(f.answer = $answer AND g.answer <> $answer AND g.t > f.t),
               (SELECT NOT bool_or(c.answer = $answer) FROM dns_answers c JOIN measurements cm USING (measurement_id)
                WHERE cm.domain = $d AND c.side = 'control')
        FROM dns_answers f JOIN dns_answers g USING (measurement_id, transaction_id) JOIN measurements m USING (measurement_id)
        WHERE m.domain = $d AND f.side = 'probe' AND g.side = 'probe' AND f.engine = 'udp'
          AND f.response_index = 0 AND g.response_index >= 1""",
    "dns-drop": """
        SELECT bool_and(side <> 'probe' OR failure IN ('generic_timeout_error', 'dns_temporary_failure', 'dns_servfail_error')),
               bool_or(side = 'control' AND answer IS NOT NULL)
        FROM dns_answers JOIN measurements USING (measurement_id) WHERE domain = $d""",
    "ip-blackhole": _failure_mark("tcp_connects", "generic_timeout_error"),
    "ip-reject": _failure_mark("tcp_connects", "connection_refused"),
    "tls-reset": _failure_mark("tls_handshakes", "connection_reset"),
    "tls-drop": _failure_mark("tls_handshakes", "generic_timeout_error"),
    "tls-mitm": """
        SELECT bool_or(side = 'probe' AND cert_valid = false AND cert_issuer NOT LIKE '%lab root%'),
               bool_or(side = 'control' AND cert_valid)
        FROM tls_handshakes JOIN measurements USING (measurement_id) WHERE domain = $d""",
    "http-reset": """
        SELECT bool_or(side = 'probe' AND failure = 'connection_reset'), bool_or(side = 'control' AND status_code = 200)
        FROM http_transactions JOIN measurements USING (measurement_id) WHERE domain = $d AND scheme = 'http'""",
    "http-blockpage": """
        SELECT bool_or(side = 'probe' AND body LIKE '%' || $page || '%'), bool_or(side = 'control' AND status_code = 200)
        FROM http_transactions JOIN measurements USING (measurement_id) WHERE domain = $d AND scheme = 'http'""",
    "throttle": """
        SELECT median(kbit_per_s) FILTER (variant = 'target') < 0.5 * median(kbit_per_s) FILTER (variant = 'scrambled'),
               median(kbit_per_s) FILTER (side = 'control') > 2 * median(kbit_per_s) FILTER (variant = 'target')
        FROM throughput_samples JOIN measurements USING (measurement_id) WHERE domain = $d""",
}


def _scenarios() -> list[Path | None]:
    # None stands for "no scenario found": the test then skips, or fails
    # under CI=true, through shared_path (which cannot run at collection).
    return sorted(SHARED.joinpath(*SCENARIOS).glob("*.toml")) or [None]


@pytest.mark.parametrize("path", _scenarios(), ids=lambda p: p.stem if p else "missing")
def test_shared_scenario_scores_fully_correct(path):
    if path is None:
        folder = shared_path(*SCENARIOS)
        pytest.fail(f"{folder} holds no scenario (*.toml)")
    require_root("ip", "iptables", "tc")
    from lab.runner import run_scenario
    from lab.scenario import load

    result = run_scenario(path, keep=True)
    db = Path(result["database"])
    try:
        wrong = [r for r in result["results"] if not r["correct"]]
        assert not wrong, (wrong, result.get("errors"))
        assert result["correct"] == result["total"] == len(load(path).expect)
        assert result["seconds"] < 60
        con = duckdb.connect(str(db), read_only=True)
        for rule in load(path).censor:
            assert_marked(con, rule)
        con.close()
    finally:
        os.environ.pop("VANTAGE_LAB_KEEP", None)
        shutil.rmtree(db.parent, ignore_errors=True)


def assert_marked(con, rule) -> None:
    """The censor ``rule``'s mark is in the probe's observations and not in the control's (MARKS)."""
    sql = MARKS[rule.action]
    params = {"d": rule.domain}
    if "$answer" in sql:
        params["answer"] = rule.answer
    if "$page" in sql:
        params["page"] = rule.page
    probe_mark, control_clean = con.execute(sql, params).fetchone()
    assert probe_mark, f"{rule.action} on {rule.domain}: no mark in the probe's observations"
    assert control_clean, f"{rule.action} on {rule.domain}: the control looks affected too"


def test_every_censor_action_has_a_mark():
    # A new censor action needs its probe-side mark here, or no scenario
    # proves the action reaches the probe's observations.
    from lab.scenario import ACTIONS

    assert sorted(MARKS) == sorted(ACTIONS)
