"""A running lab: sites over HTTPS with the lab CA, the DNS servers, the ISP
resolver's censor rules, site behaviours, and the control's path avoiding the
censor. Raw dnspython/ssl from inside the namespaces: no probe code involved."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from lab import plan
from lab.runner import ScenarioLab, combine, score
from lab.scenario import parse_text
from lab.topology import in_netns

pytestmark = pytest.mark.lab

SCENARIO = """\
name = "lab-selftest"
description = "behaviours and resolver rules"

[[sites]]
domain = "open.example"
title = "Open Site"
size = 5000

[[sites]]
domain = "nx.example"

[[sites]]
domain = "bogon.example"

[[sites]]
domain = "dropped.example"

[[sites]]
domain = "geo.example"
geo_dns = true
addresses = 2

[[sites]]
domain = "fenced.example"
behaviour = "server-block"

[[sites]]
domain = "offline.example"
behaviour = "down"

[[sites]]
domain = "slow.example"
behaviour = "slow"
rate_kbit = 400
size = 50000

[[sites]]
domain = "moved.example"
behaviour = "redirect"
redirect_to = "https://open.example/"

[[sites]]
domain = "dyn.example"
behaviour = "dynamic"

[[censor]]
action = "dns-nxdomain"
domain = "nx.example"

[[censor]]
action = "dns-redirect"
domain = "bogon.example"
answer = "10.10.34.34"

[[censor]]
action = "dns-drop"
domain = "dropped.example"

[[expect]]
url = "https://open.example/"
status = "ok"
"""


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("lab tests need root, and CI must run them")
        pytest.skip("lab tests need root (network namespaces)")
    sc = parse_text(SCENARIO, "selftest.toml")
    # Only our own parts: the on-path censor and the helper have their own tests.
    with ScenarioLab(sc, with_censor=False, with_helper=False) as lab:
        yield lab


def query(server: str, name: str, timeout: float = 2.0):
    try:
        r = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=timeout)
    except dns.exception.Timeout:
        return "timeout", []
    return dns.rcode.to_text(r.rcode()), sorted(str(rd) for rrset in r.answer for rd in rrset)


def fetch(ip: str, host: str, cafile: str | None, tls: bool = True) -> tuple[int, bytes]:
    with socket.create_connection((ip, 443 if tls else 80), timeout=5) as raw:
        s = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=host) if tls else raw
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_https_from_probe_with_lab_ca(slab):
    ip = slab.addresses["open.example"][0]
    status, body = in_netns(slab.ns("probe"), fetch, ip, "open.example", str(slab.ca.cert_path))
    assert status == 200 and len(body) == 5000 and b"<title>Open Site</title>" in body
    # Without the lab CA the certificate must not verify.
    with pytest.raises(ssl.SSLCertVerificationError):
        in_netns(slab.ns("probe"), fetch, ip, "open.example", None)


def test_dns_via_isp_and_public_resolver(slab):
    want = ("NOERROR", slab.addresses["open.example"])
    assert in_netns(slab.ns("probe"), query, plan.ISP_RESOLVER, "open.example") == want
    assert in_netns(slab.ns("probe"), query, plan.PUBLIC_RESOLVER, "open.example") == want
    assert in_netns(slab.ns("probe"), query, plan.ISP_RESOLVER, "absent.example")[0] == "NXDOMAIN"
    # The probe's system resolver is the ISP resolver.
    out = slab.lab.run("probe", ["getent", "hosts", "open.example"]).stdout
    assert slab.addresses["open.example"][0] in out


def test_isp_resolver_rules(slab):
    probe = slab.ns("probe")
    assert in_netns(probe, query, plan.ISP_RESOLVER, "nx.example") == ("NXDOMAIN", [])
    assert in_netns(probe, query, plan.ISP_RESOLVER, "bogon.example") == ("NOERROR", ["10.10.34.34"])
    t = time.monotonic()
    assert in_netns(probe, query, plan.ISP_RESOLVER, "dropped.example", 1.0) == ("timeout", [])
    assert time.monotonic() - t >= 0.9
    # The rules live in the ISP resolver only: the public resolver answers truthfully.
    for name in ("nx.example", "bogon.example", "dropped.example"):
        assert in_netns(probe, query, plan.PUBLIC_RESOLVER, name) == ("NOERROR", slab.addresses[name])


def test_geo_dns_gives_control_other_valid_addresses(slab):
    probe_side = in_netns(slab.ns("probe"), query, plan.ISP_RESOLVER, "geo.example")[1]
    control_side = in_netns(slab.ns("control"), query, plan.CONTROL_RESOLVER, "geo.example")[1]
    assert len(probe_side) == 2 and len(control_side) == 2 and not set(probe_side) & set(control_side)
    assert in_netns(slab.ns("control"), fetch, control_side[0], "geo.example", str(slab.ca.cert_path))[0] == 200


def test_behaviours(slab):
    ca = str(slab.ca.cert_path)
    probe, control = slab.ns("probe"), slab.ns("control")
    fenced = slab.addresses["fenced.example"][0]
    status, body = in_netns(probe, fetch, fenced, "fenced.example", ca)
    assert status == 403 and b"Access denied in your region" in body
    assert in_netns(control, fetch, fenced, "fenced.example", ca)[0] == 200
    for ns in (probe, control):
        with pytest.raises(ConnectionRefusedError):
            in_netns(ns, fetch, slab.addresses["offline.example"][0], "offline.example", ca)
    status, body = in_netns(probe, fetch, slab.addresses["moved.example"][0], "moved.example", ca, False)
    assert status == 301
    a = in_netns(probe, fetch, slab.addresses["dyn.example"][0], "dyn.example", ca)[1]
    b = in_netns(probe, fetch, slab.addresses["dyn.example"][0], "dyn.example", ca)[1]
    assert a != b and a.split(b"</title>")[0] == b.split(b"</title>")[0]
    t = time.monotonic()
    status, body = in_netns(control, fetch, slab.addresses["slow.example"][0], "slow.example", ca)
    elapsed = time.monotonic() - t
    # 50 kB at 400 kbit/s is 1 s: paced by the server, for the control too.
    assert status == 200 and len(body) == 50000 and 0.8 < elapsed < 3


def test_control_path_does_not_cross_censor(slab):
    censor = slab.ns("censor")
    # Counting rules (no target): they match and count, and change nothing.
    rules = [["-s", "198.18.4.0/24"], ["-d", "198.18.4.0/24"], ["-s", plan.PROBE_ADDRESS]]
    for r in rules:
        subprocess.run(["ip", "netns", "exec", censor, "iptables", "-w", "-I", "FORWARD", *r], check=True)
    try:
        ca = str(slab.ca.cert_path)
        assert in_netns(slab.ns("control"), query, plan.CONTROL_RESOLVER, "open.example")[0] == "NOERROR"
        assert in_netns(slab.ns("control"), fetch, slab.addresses["open.example"][0], "open.example", ca)[0] == 200
        assert in_netns(slab.ns("probe"), fetch, slab.addresses["open.example"][0], "open.example", ca)[0] == 200
        out = subprocess.run(["ip", "netns", "exec", censor, "iptables", "-w", "-nvxL", "FORWARD"], capture_output=True, text=True, check=True).stdout
        counts = {}
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 8 and f[0].isdigit():
                counts[(f[6], f[7])] = int(f[0])
        assert counts[("198.18.4.0/24", "0.0.0.0/0")] == 0
        assert counts[("0.0.0.0/0", "198.18.4.0/24")] == 0
        assert counts[(plan.PROBE_ADDRESS, "0.0.0.0/0")] > 0  # the probe's traffic does cross it
    finally:
        for r in rules:
            subprocess.run(["ip", "netns", "exec", censor, "iptables", "-w", "-D", "FORWARD", *r])


def test_scoring_rules():
    sc = parse_text(SCENARIO.replace('status = "ok"', 'status = "blocked"\nlayer = "dns"\nmethod = "dns.nxdomain"'), "s.toml")
    verdicts = {"https://open.example/": {"web_connectivity": {"status": "blocked", "layer": "dns", "method": "dns.bogon", "confidence": 0.9}}}
    result = score(sc, verdicts, 1.0)
    assert result["total"] == 1 and result["correct"] == 0
    assert result["results"][0]["got"]["method"] == "dns.bogon"
    verdicts["https://open.example/"]["web_connectivity"]["method"] = "dns.nxdomain"
    assert score(sc, verdicts, 1.0)["correct"] == 1
    assert score(sc, {}, 1.0)["results"][0]["got"] is None
    # A throttling finding overrides an 'ok' web verdict, not a 'blocked' one.
    thr = {"status": "throttled", "layer": None, "method": "throttle.sni"}
    assert combine({"web_connectivity": {"status": "ok"}, "throttling": thr}) is thr
    assert combine({"web_connectivity": {"status": "blocked"}, "throttling": thr})["status"] == "blocked"


def test_cli_malformed_scenario_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SCENARIO.replace('title = "Open Site"', 'titel = "Open Site"'))
    result = subprocess.run([sys.executable, "-m", "cli.main", "lab", "run", str(bad), "--json"], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 2
    assert "bad.toml:6: unknown key 'titel' in [[sites]]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("vantage: ")
    assert result.stdout == ""


def test_run_scenario_prints_score_and_cleans_up(tmp_path):
    """End to end with whatever probe/helper/analysis the tree has: the scored
    output always comes back, with one result per expectation, and the lab is gone."""
    from lab.runner import run_scenario
    from lab.topology import live_prefixes

    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("lab tests need root (network namespaces)")
    path = tmp_path / "mini.toml"
    path.write_text(
        'name = "mini"\n[[sites]]\ndomain = "open.example"\n[[sites]]\ndomain = "nx.example"\n'
        '[[censor]]\naction = "dns-nxdomain"\ndomain = "nx.example"\n'
        '[[expect]]\nurl = "https://open.example/"\nstatus = "ok"\n'
        '[[expect]]\nurl = "https://nx.example/"\nstatus = "blocked"\nlayer = "dns"\nmethod = "dns.nxdomain"\n'
    )
    before = set(live_prefixes())
    t = time.monotonic()
    result = run_scenario(path)
    assert time.monotonic() - t < 60
    assert result["scenario"] == "mini" and result["total"] == 2 and len(result["results"]) == 2
    assert {"url", "expected", "got", "correct"} <= set(result["results"][0])
    assert set(live_prefixes()) <= before
    if not result.get("errors"):
        assert all(r["got"] is not None for r in result["results"])
