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


# --- issue 11: IPv6, CDNs, controls the site refuses, flaky sites -----------------

AWKWARD = """\
name = "awkward"
probe_ipv6 = "broken"

[[sites]]
domain = "dual.example"
ipv6 = true

[[sites]]
domain = "cdn.example"
cdn = true
addresses = 2

[[sites]]
domain = "picky.example"
behaviour = "server-block"
block_from = "control"

[[sites]]
domain = "flaky.example"
behaviour = "flaky"
loss = 0.3

[[censor]]
action = "ip-blackhole"
domain = "dual.example"
family = "ipv6"

[[expect]]
url = "https://dual.example/"
status = "ok"
"""


def test_awkward_keys_parse():
    sc = parse_text(AWKWARD, "s.toml")
    assert sc.probe_ipv6 == "broken" and sc.needs_ipv6
    dual, cdn, picky, flaky = sc.sites
    assert dual.ipv6 and not cdn.ipv6 and cdn.cdn and cdn.addresses == 2
    assert picky.block_from == "control" and flaky.behaviour == "flaky" and flaky.loss == 0.3
    assert sc.censor[0].family == "ipv6"
    plain = parse_text(GOOD, "s.toml")
    assert plain.probe_ipv6 == "none" and not plain.needs_ipv6 and plain.censor[0].family is None
    assert parse_text(AWKWARD.replace("loss = 0.3", "loss = 0.5"), "s.toml").sites[3].loss == 0.5


@pytest.mark.parametrize("old, new, needle, message", [
    ('probe_ipv6 = "broken"', 'probe_ipv6 = "flaky"', "probe_ipv6", "unknown probe_ipv6 'flaky' at the top level (expected one of: none, broken, working)"),
    ('probe_ipv6 = "broken"', "probe_ipv6 = true", "probe_ipv6", "'probe_ipv6' in the top level must be a string, not bool"),
    ("ipv6 = true", 'ipv6 = "yes"', 'ipv6 = "yes"', "'ipv6' in [[sites]] must be a boolean, not str"),
    ('family = "ipv6"', 'family = "inet6"', "family", "unknown family 'inet6' in [[censor]] (expected one of: ipv4, ipv6)"),
    ('block_from = "control"', 'block_from = "everyone"', "block_from", "unknown block_from 'everyone' in [[sites]] (expected: probe, control)"),
    ("loss = 0.3", "loss = 1.5", "loss", "'loss' in [[sites]] must be a share between 0 and 1 (exclusive), e.g. 0.3"),
    ("loss = 0.3", 'loss = "30%"', "loss", "'loss' in [[sites]] must be a number, not str"),
    ("addresses = 2", "addresses = 1", "cdn = true", "'cdn' in [[sites]] needs 'addresses' of 2 or more"),
    ("cdn = true\n", "cdn = true\ngeo_dns = true\n", "cdn = true", "'cdn' and 'geo_dns' in [[sites]] exclude each other (a CDN site already answers per side)"),
    ('domain = "dual.example"\nipv6 = true', 'domain = "dual.example"', "family", "family = \"ipv6\" in [[censor]]: site 'dual.example' has no IPv6 addresses (set ipv6 = true on it)"),
    ('domain = "picky.example"', 'domain = "picky.example"\nloss = 0.1', "loss = 0.1", "'loss' in [[sites]] is only valid with behaviour = \"flaky\""),
])
def test_awkward_mistakes_name_line_and_key(old, new, needle, message):
    text = AWKWARD.replace(old, new, 1)
    assert text != AWKWARD
    assert err(text) == f"s.toml:{line_of(text, needle)}: {message}"


def test_flaky_needs_loss_and_family_matches_ip():
    text = AWKWARD.replace("loss = 0.3\n", "")
    header = line_of(text, 'domain = "flaky.example"') - 1
    assert err(text) == f"s.toml:{header}: behaviour 'flaky' in [[sites]] needs 'loss'"
    text = GOOD.replace('action = "dns-redirect"\ndomain = "a.example"\nanswer = "10.0.0.1"',
                        'action = "ip-reject"\nip = "198.18.100.9"\nfamily = "ipv6"')
    assert err(text) == f"s.toml:{line_of(text, 'family')}: family = \"ipv6\" in [[censor]] does not match ip '198.18.100.9'"
    text = GOOD.replace('answer = "10.0.0.1"', 'answer = "2001:2::99"\nfamily = "ipv4"')
    assert err(text) == f"s.toml:{line_of(text, 'answer')}: 'answer' in [[censor]] is an IPv6 address but family = \"ipv4\""
    assert parse_text(GOOD.replace('"10.0.0.1"', '"2001:2::99"'), "s.toml").censor[0].answer == "2001:2::99"


def test_awkward_scenarios_of_the_tests_parse():
    from pathlib import Path

    paths = sorted((Path(__file__).parent / "scenarios").glob("*.toml"))
    assert {p.stem for p in paths} >= {"ipv6-none", "ipv6-broken", "ipv6-working", "cdn", "control-refused", "flaky"}
    for p in paths:
        sc = load(p)
        assert sc.expect
