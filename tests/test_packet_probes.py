"""The packet probes: dns-injection and traceroute (probes/dns_injection.py,
probes/traceroute.py, probes/packets.py).

Unit tests run anywhere; the lab tests build a lab with three routers
between the isp and the censor (``hops = 3``) and run `vantage run
dns-injection|traceroute --json` in its probe namespace. They skip without
root, never under CI=true (tests/rootonly.py).
"""

from __future__ import annotations

import json
import socket
import struct
import sys

import pytest
from click.testing import CliRunner

from probes import packets
from probes import traceroute as tr
from probes.dns_injection import json_line as dns_json_line
from tests.rootonly import require_root

# --- unit ------------------------------------------------------------------------


def _ip(src: str, dst: str, proto: int, body: bytes, ttl: int = 60, ip_id: int = 7) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ip_id, 0, ttl, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head + body


def test_parse_reads_ttl_id_ports_flags_and_icmp_quotes():
    tcp = struct.pack("!HHIIHHHH", 443, 40000, 1, 2, (5 << 12) | 0x14, 0, 0, 0)
    seen = packets.parse(_ip("198.18.100.1", "198.18.1.2", 6, tcp, ttl=59, ip_id=0))
    assert (seen.ip_ttl, seen.ip_id, seen.sport, seen.dport, seen.flag_text) == (59, 0, 443, 40000, "AR")
    quoted = _ip("198.18.1.2", "198.18.100.1", 17, struct.pack("!HHHH", 40001, 53, 8, 0), ttl=1)
    icmp = packets.parse(_ip("198.18.61.2", "198.18.1.2", 1, bytes([11, 0, 0, 0, 0, 0, 0, 0]) + quoted))
    assert icmp.icmp_type == 11 and icmp.quoted.sport == 40001 and icmp.quoted.dport == 53


def test_bpf_programs_end_in_accept_and_drop_and_jump_inside():
    for program in (packets.flow_program(["198.18.100.1", "198.18.100.2"], 443, 40000, flags=packets.RST),
                    packets.icmp_program(40000)):
        code = program.assemble()
        assert code[-2] == (packets.RET_K, 0, 0, program.snaplen) and code[-1] == (packets.RET_K, 0, 0, 0)
        for i, (op, jt, jf, _) in enumerate(code[:-2]):
            if op in (packets.JEQ_K, packets.JSET_K):
                assert i + 1 + jt < len(code) and i + 1 + jf < len(code)


def test_anonymised_replaces_our_address_and_keeps_a_valid_checksum():
    raw = _ip("198.18.1.2", "198.18.100.1", 17, b"\0" * 8)
    out = packets.anonymised(raw, "198.18.1.2", sent=True)
    assert out[12:16] == socket.inet_aton("127.0.0.1")
    assert packets._checksum(out[:20]) == 0


def _hop(ttl, test, control):
    def obs(kind):
        return {"ttl": ttl, "expired_from": kind if kind and kind[0].isdigit() else None, "arrived": kind == "arrived",
                "injected": kind == "injected" or kind == "injected+arrived", "details": []} | (
            {"arrived": True} if kind == "injected+arrived" else {})
    return {"ttl": ttl, "test": obs(test), "control": obs(control)}


def test_locate_in_path_on_path_and_nothing():
    routers = [_hop(t, f"10.0.{t}.1", f"10.0.{t}.1") for t in range(1, 5)]
    dropped = routers + [_hop(5, None, "arrived")]
    assert tr.locate(dropped) == (4, "10.0.4.1", "in-path")
    reset = routers + [_hop(5, "injected", "arrived")]
    assert tr.locate(reset) == (4, "10.0.4.1", "in-path")
    injected = routers + [_hop(5, "injected+arrived", "arrived")]
    assert tr.locate(injected) == (4, "10.0.4.1", "on-path")
    assert tr.locate(routers + [_hop(5, "arrived", "arrived")]) == (None, None, None)


def test_json_lines_follow_the_contract():
    line = dns_json_line({"input": "http://a.example/", "test_keys": {"x_injected": True, "queries": [
        {"answers": [{"answer_type": "A", "ipv4": "10.0.0.1"}], "x_ip_ttl": 60, "x_ip_id": 1, "t": 0.01}]}})
    assert line["input"] == "http://a.example/" and line["injected"] is True and line["answers"][0]["ip_ttl"] == 60
    keys = tr.new_test_keys() | {"x_interference": True, "x_censor_hop": 5, "x_censor_address": "198.18.63.2",
                                 "x_position": "in-path", "x_runs_total": 3, "x_agreeing_runs": 3}
    line = tr.json_line({"input": "http://a.example/", "test_keys": keys})
    assert {k: line[k] for k in ("input", "interference", "censor_hop", "censor_address", "position", "runs",
                                 "agreeing_runs")} == {
        "input": "http://a.example/", "interference": True, "censor_hop": 5, "censor_address": "198.18.63.2",
        "position": "in-path", "runs": 3, "agreeing_runs": 3}


@pytest.mark.parametrize("test", ["dns-injection", "traceroute"])
def test_without_privileges_one_line_and_exit_2(tmp_path, monkeypatch, capsys, test):
    from cli import main

    monkeypatch.setattr(packets, "have_privileges", lambda: False)
    monkeypatch.setenv("VANTAGE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setattr(sys, "argv", ["vantage", "run", test, "--yes", "--url", "http://a.example/", "--db",
                                      str(tmp_path / "x.duckdb"), "--target", "192.0.2.1", "--probe-cc", "ZZ",
                                      "--probe-asn", "AS0", "--helper", "http://192.0.2.1:8080/"])
    with pytest.raises(SystemExit) as exited:
        main.main()
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vantage: ")]
    assert lines[-1] == f"vantage: {packets.NO_PRIVILEGES}"
    assert len([line for line in lines if "raw packets" in line]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--target", "not-an-ip"], "vantage: --target not-an-ip: not an IPv4 address"),
    ([], "vantage: dns-injection needs an address that runs no DNS resolver: --target IP, or a --helper"),
])
def test_dns_injection_needs_an_ipv4_target_or_a_helper(tmp_path, monkeypatch, capsys, extra, message):
    from cli import main

    monkeypatch.setenv("VANTAGE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.delenv("VANTAGE_HELPERS", raising=False)
    monkeypatch.setattr(sys, "argv", ["vantage", "run", "dns-injection", "--yes", "--url", "http://a.example/", "--db",
                                      str(tmp_path / "x.duckdb"), "--probe-cc", "ZZ", "--probe-asn", "AS0", *extra])
    with pytest.raises(SystemExit) as exited:
        main.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


# --- lab -------------------------------------------------------------------------

SCENARIO = """
name = "packet-probes"
hops = 3
[[sites]]
domain = "free.example"
[[sites]]
domain = "inject.example"
[[sites]]
domain = "reset.example"
[[sites]]
domain = "tlsreset.example"
[[sites]]
domain = "tlsdrop.example"
[[sites]]
domain = "dnsdrop.example"
[[sites]]
domain = "down.example"
behaviour = "down"
[[sites]]
domain = "reject.example"
[[censor]]
action = "ip-reject"
domain = "reject.example"
[[censor]]
action = "dns-inject"
domain = "inject.example"
answer = "10.10.34.34"
[[censor]]
action = "http-reset"
domain = "reset.example"
[[censor]]
action = "tls-reset"
domain = "tlsreset.example"
[[censor]]
action = "tls-drop"
domain = "tlsdrop.example"
[[censor]]
action = "dns-drop"
domain = "dnsdrop.example"
[[expect]]
url = "http://free.example/"
status = "ok"
"""
URLS = ["http://free.example/", "http://inject.example/", "http://reset.example/", "https://tlsreset.example/",
        "https://tlsdrop.example/", "http://dnsdrop.example/"]


@pytest.fixture(scope="module")
def lab():
    require_root("ip", "iptables", "tc")
    from lab.runner import ScenarioLab
    from lab.scenario import parse_text

    with ScenarioLab(parse_text(SCENARIO, "packet-probes.toml")) as slab:
        yield slab


def _run(lab, test: str, urls: list[str], *extra: str) -> dict[str, dict]:
    from lab import plan
    from lab.runner import VANTAGE

    argv = [*VANTAGE, "run", test, "--yes", "--json", "--db", str(lab.workdir / f"{test}.duckdb"),
            "--resolver", plan.PUBLIC_RESOLVER, "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0",
            "--target", lab.addresses["free.example"][0], *extra]
    for network in plan.PUBLIC_NETWORKS:
        argv += ["--public-network", network]
    for url in urls:
        argv += ["--url", url]
    env = lab._child_env()
    proc = lab.lab.run("probe", argv, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == len(urls), proc.stdout
    return {line["input"]: line for line in lines}


@pytest.mark.lab
def test_dns_injection_flags_exactly_the_injected_domain(lab):
    got = _run(lab, "dns-injection", URLS)
    assert {url for url, line in got.items() if line["injected"]} == {"http://inject.example/"}
    answer = got["http://inject.example/"]["answers"][0]
    assert answer["answers"][0]["ipv4"] == "10.10.34.34"
    # Forged by the censor (hop 5, TTL 64 - 4), scapy's IP ID 1.
    assert answer["ip_ttl"] == 60 and answer["ip_id"] == 1


@pytest.mark.lab
def test_traceroute_names_the_censor_hop_and_its_position(lab):
    from lab import plan

    got = _run(lab, "traceroute", URLS)
    censor = plan.censor_probe_side(3)
    expected = {
        "http://inject.example/": "on-path",      # injects; the query goes on
        "http://reset.example/": "in-path",       # the request is dropped, RSTs injected
        "https://tlsreset.example/": "in-path",
        "https://tlsdrop.example/": "in-path",    # dropping
        "http://dnsdrop.example/": "in-path",
    }
    for url, position in expected.items():
        line = got[url]
        assert line["interference"] is True, line
        assert (line["censor_hop"], line["censor_address"], line["position"]) == (5, censor, position), line
        assert line["runs"] == 3 and 2 <= line["agreeing_runs"] <= 3, line
    free = got["http://free.example/"]
    assert free["interference"] is False and free["censor_hop"] is None and free["position"] is None



@pytest.mark.lab
def test_capture_marks_the_censors_resets_injected_and_a_closed_ports_genuine(lab):
    import duckdb

    from lab import plan
    from lab.runner import VANTAGE

    db = lab.workdir / "capture.duckdb"
    argv = [*VANTAGE, "run", "web", "--capture", "--yes", "--quiet", "--db", str(db), "--resolver", plan.PUBLIC_RESOLVER,
            "--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0", "--helper", plan.HELPER_URL, "--ca-file", str(lab.ca.cert_path)]
    for network in plan.PUBLIC_NETWORKS:
        argv += ["--public-network", network]
    for url in ("http://reset.example/", "http://down.example/", "http://reject.example/", "http://free.example/"):
        argv += ["--url", url]
    proc = lab.lab.run("probe", argv, timeout=240, env=lab._child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT m.domain, p.kind, p.ip_ttl, p.baseline_ttl, p.injected FROM packets p "
                       "JOIN measurements m USING (measurement_id)").fetchall()
    con.close()
    by = {}
    for domain, kind, ttl, baseline, injected in rows:
        by.setdefault((domain, kind), []).append((ttl, baseline, injected))
    # The censor's RSTs: after the request (http-reset) and to the SYN (ip-reject).
    assert by[("reset.example", "rst")] and all(i is True for _, _, i in by[("reset.example", "rst")]), by
    assert by[("reject.example", "rst")] and all(i is True for _, _, i in by[("reject.example", "rst")]), by
    # The server's own RSTs from a closed port, and an uncensored site's packets.
    assert by[("down.example", "rst")] and all(i is False for _, _, i in by[("down.example", "rst")]), by
    assert all(i is False for (d, k), v in by.items() if d == "free.example" and k != "syn_ack" for _, _, i in v), by
    assert by[("free.example", "syn_ack")]
    # The analysis reads them: blocking verdicts on the wire get >= 0.95.
    from lab.runner import analyze_db

    verdicts = analyze_db(db, lab.geo_dir)
    for url, layer in (("http://reset.example/", "http"), ("http://reject.example/", "tcp")):
        got = verdicts[url]["web_connectivity"]
        assert (got["status"], got["layer"]) == ("blocked", layer) and got["confidence"] >= 0.95, (url, got)
    assert verdicts["http://down.example/"]["web_connectivity"]["status"] == "down"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
