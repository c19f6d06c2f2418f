"""Scenario parser: the shipped scenarios parse, and every mistake is reported
as one line naming the file, the line and the key."""

from __future__ import annotations

import pytest

from lab.scenario import ScenarioError, load, parse_text
from shared import SHARED as SHARED_ROOT, shared_path

SCENARIOS = ("lab", "scenarios")

GOOD = """\
name = "t"
description = "test"

[[sites]]
domain = "a.example"
title = "A"

[[sites]]
domain = "b.example"
behaviour = "slow"
rate_kbit = 64

[[censor]]
action = "dns-redirect"
domain = "a.example"
answer = "10.0.0.1"

[[expect]]
url = "https://a.example/"
status = "blocked"
layer = "dns"
method = "dns.bogon"

[[expect]]
url = "https://b.example/"
status = "ok"
"""


def err(text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_text(text, "s.toml")
    return str(info.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, l in enumerate(text.splitlines(), 1) if needle in l)


@pytest.mark.parametrize("path", sorted(SHARED_ROOT.joinpath(*SCENARIOS).glob("*.toml")) or [None],
                         ids=lambda p: p.stem if p else "missing")
def test_shared_scenarios_parse(path):
    if path is None:  # skips, or fails under CI=true, when the shared folder is absent
        pytest.fail(f"{shared_path(*SCENARIOS)} holds no scenario (*.toml)")
    sc = load(path)
    assert sc.name and sc.expect
    for e in sc.expect:
        assert e.line > 0 and (e.status != "blocked" or e.layer)


def test_good_scenario_fields():
    sc = parse_text(GOOD, "s.toml")
    assert [s.domain for s in sc.sites] == ["a.example", "b.example"]
    assert sc.sites[1].rate_kbit == 64 and sc.sites[0].behaviour == "normal"
    rule = sc.censor[0]
    assert (rule.action, rule.domain, rule.answer, rule.status, rule.line) == ("dns-redirect", "a.example", "10.0.0.1", 200, line_of(GOOD, "[[censor]]"))
    assert sc.expect[0].method == "dns.bogon"
    assert sc.needs_throttling_test(sc.expect[1]) and not sc.needs_throttling_test(sc.expect[0])


def test_unknown_key_names_key_line_and_table():
    text = GOOD.replace('answer = "10.0.0.1"', 'answer = "10.0.0.1"\ndomian = "x.example"')
    assert err(text) == f"s.toml:{line_of(text, 'domian')}: unknown key 'domian' in [[censor]]"


def test_unknown_top_level_key():
    text = "nmae = 'x'\n" + GOOD
    assert err(text).startswith("s.toml:1: unknown key 'nmae'")


def test_wrong_type():
    text = GOOD.replace("rate_kbit = 64", 'rate_kbit = "fast"')
    msg = err(text)
    assert msg.startswith(f"s.toml:{line_of(text, 'rate_kbit')}:") and "'rate_kbit'" in msg and "integer" in msg


def test_bool_is_not_an_integer():
    assert "'size'" in err(GOOD.replace('title = "A"', 'title = "A"\nsize = true'))


def test_unknown_action_and_behaviour():
    text = GOOD.replace('"dns-redirect"', '"dns-poison"')
    assert err(text).startswith(f"s.toml:{line_of(text, 'dns-poison')}: unknown action 'dns-poison'")
    text = GOOD.replace('"slow"', '"sleepy"')
    assert err(text).startswith(f"s.toml:{line_of(text, 'sleepy')}: unknown behaviour 'sleepy'")


def test_blocked_needs_layer():
    text = GOOD.replace('layer = "dns"\n', "")
    assert err(text) == f"s.toml:{line_of(text, '[[expect]]')}: status = \"blocked\" in [[expect]] needs 'layer'"


def test_missing_required_keys():
    text = GOOD.replace('domain = "a.example"\ntitle', 'title')
    assert "missing required key 'domain' in [[sites]]" in err(text)
    text = GOOD.replace('answer = "10.0.0.1"\n', "")
    assert "needs 'answer'" in err(text)
    assert "missing required key 'name'" in err(GOOD.replace('name = "t"\n', ""))


def test_cross_checks():
    assert "not a site" in err(GOOD.replace('url = "https://b.example/"', 'url = "https://c.example/"'))
    assert "unknown status" in err(GOOD.replace('status = "ok"', 'status = "fine"'))
    assert "unknown layer" in err(GOOD.replace('layer = "dns"', 'layer = "ip"'))
    assert "needs 'rate_kbit'" in err(GOOD.replace("rate_kbit = 64\n", ""))
    assert "IPv4" in err(GOOD.replace('"10.0.0.1"', '"not-an-ip"'))
    assert "defined twice" in err(GOOD.replace('domain = "b.example"', 'domain = "a.example"').replace("https://b.example/", "https://a.example/"))


def test_invalid_toml_has_line():
    msg = err(GOOD + "\n[[expect]\n")
    assert msg.startswith("s.toml:") and "invalid TOML" in msg


def test_unreadable_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load(tmp_path / "nope.toml")
