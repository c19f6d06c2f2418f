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
    # An ICMP error quoting our own packet: the quoted source goes too.
    quoted = _ip("198.18.1.2", "198.18.100.1", 17, struct.pack("!HHHH", 40001, 53, 8, 0), ttl=1)
    icmp = _ip("198.18.61.2", "198.18.1.2", 1, bytes([11, 0, 0, 0, 0, 0, 0, 0]) + quoted)
    out = packets.anonymised(icmp, "198.18.1.2", sent=False)
    assert socket.inet_aton("198.18.1.2") not in out
    assert out[16:20] == out[28 + 12:28 + 16] == socket.inet_aton("127.0.0.1")
    assert packets._checksum(out[:20]) == 0 and packets._checksum(out[28:48]) == 0 and packets._checksum(out[20:]) == 0


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


def test_ipv6_flow_program_matches_all_four_words_and_jumps_inside():
    program = packets.flow_program6(["2001:2:0:100::5", "2001:2:0:100::6"], None, None, flags=packets.RST | packets.FIN)
    code = program.assemble()
    assert code[-2] == (packets.RET_K, 0, 0, program.snaplen) and code[-1] == (packets.RET_K, 0, 0, 0)
    loads = [k for op, _, _, k in code if op == packets.LD_W_ABS]
    # The source address, word by word, read relative to the network header.
    assert loads[:4] == [(packets.SKF_NET_OFF + 8 + 4 * w) & 0xFFFFFFFF for w in range(4)]
    for i, (op, jt, jf, k) in enumerate(code[:-2]):
        if op in (packets.JEQ_K, packets.JSET_K):
            assert i + 1 + jt < len(code) and i + 1 + jf < len(code)
        if op == packets.JA:
            assert i + 1 + k < len(code)
    assert packets.flow_program6([], None, None).assemble()[0] == (packets.RET_K, 0, 0, 0)


def test_parse6_reads_hop_limit_ports_and_flags_without_an_ip_id():
    tcp = struct.pack("!HHIIHHHH", 443, 40000, 1, 2, (5 << 12) | 0x04, 0, 0, 0)
    seen = packets.parse6(tcp, "2001:2:0:100::5", 61, packets.IPPROTO_TCP)
    assert (seen.src, seen.ip_ttl, seen.ip_id, seen.sport, seen.dport, seen.flag_text) == (
        "2001:2:0:100::5", 61, None, 443, 40000, "R")
    assert packets.parse6(tcp[:10], "2001:2:0:100::5", 61, packets.IPPROTO_TCP) is None


def _seen(src, sport, dport, flags, ttl, ip_id=5):
    tcp = struct.pack("!HHIIHHHH", sport, dport, 1, 2, (5 << 12) | flags, 0, 0, 0)
    if ":" in src:
        return packets.parse6(tcp, src, ttl, packets.IPPROTO_TCP)
    return packets.parse(_ip(src, "198.18.1.2", 6, tcp, ttl=ttl, ip_id=ip_id))


@pytest.mark.parametrize("server", ["198.18.100.1", "2001:2:0:100::1"])
def test_capture_stores_rsts_odd_fins_and_one_baseline_per_server(server):
    import asyncio

    from probes import capture

    cap = capture.Capture([server], 80, None)
    SA, F, R = packets.SYN | packets.ACK, packets.FIN | packets.ACK, packets.RST
    cap.packets = [_seen(server, 80, 40001, SA, 60), _seen(server, 80, 40001, F, 60),        # a clean connection
                   _seen(server, 80, 40002, SA, 60), _seen(server, 80, 40002, R, 62, 1),     # an injected RST
                   _seen(server, 80, 40003, SA, 60), _seen(server, 80, 40003, F, 63, 1)]     # an injected FIN
    keys: dict = {}
    asyncio.run(capture.stop(cap, keys))
    rows = [(r["kind"], r["dport"], r["ip_ttl"], r["baseline_ttl"], r["injected"]) for r in keys["x_packets"]]
    assert rows == [("syn_ack", 40001, 60, 60, None), ("rst", 40002, 62, 60, True), ("fin", 40003, 63, 60, True)]
    assert keys["x_capture_genuine_fins"] == 1
    flow = keys["x_packets"][1]["flow"]
    assert flow == (f"[{server}]:80>40002" if ":" in server else f"{server}:80>40002")
    assert keys["x_packets"][1]["ip_id"] == (None if ":" in server else 1)


def test_capture_pings_each_refusing_server_once_and_all_at_once(monkeypatch):
    import asyncio

    from probes import capture

    calls, in_flight, most = [], [0], [0]

    async def echo(ip, clock):
        calls.append(ip)
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        return None if ip.endswith(".3") else (61, 9)

    monkeypatch.setattr(capture, "_echo_ttl", echo)
    servers = [f"198.18.100.{i}" for i in range(1, 7)]
    cap = capture.Capture(servers, 80, None)
    # Three refused connections (a RST to the SYN) to each of six servers.
    cap.packets = [_seen(ip, 80, 40000 + 10 * n + k, packets.RST | packets.ACK, 62) for n, ip in enumerate(servers)
                   for k in range(3)]
    keys: dict = {}
    asyncio.run(capture.stop(cap, keys))
    assert calls == servers[:capture.MAX_ECHOES] and most[0] == capture.MAX_ECHOES
    assert keys["x_capture_echo"] == capture.MAX_ECHOES
    marks = {(r["src"], r["injected"], r["baseline_ttl"]) for r in keys["x_packets"]}
    assert marks == {(servers[0], True, 61), (servers[1], True, 61), (servers[2], None, None), (servers[3], True, 61),
                     (servers[4], None, None), (servers[5], None, None)}


def test_traceroute_pauses_after_each_blocked_probe_and_records_it(monkeypatch):
    import asyncio

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds, *args):
        slept.append(seconds)
        await real_sleep(0)

    def obs(ttl, expired=None, arrived=False, injected=False):
        return {"ttl": ttl, "expired_from": expired, "arrived": arrived, "injected": injected, "details": []}

    async def probe(kind, dest, port, domain, ttl, clock, window):
        if domain == "example.com" or ttl < 3:
            return (obs(ttl, expired=f"10.0.{ttl}.1") if ttl < 4 else obs(ttl, arrived=True)), [], []
        return obs(ttl), [], [{"ttl": ttl}]  # dropped from hop 3 on

    monkeypatch.setattr(tr, "_probe", probe)
    monkeypatch.setattr(tr.asyncio, "sleep", sleep)
    hops, _, sent = asyncio.run(tr.sweep("http", "198.18.100.1", 80, "blocked.example", "example.com", None, 0.1,
                                   max_ttl=6, pause=0.3))
    assert [h["ttl"] for h in hops] == [1, 2, 3, 4, 5]
    assert [h["paused"] for h in hops] == [None, None, 0.3, 0.3, None]  # none after the last probe
    assert slept == [0.3, 0.3]
    assert [out["ttl"] for out in sent] == [3, 4, 5]  # each test probe's sent packet, in order
    assert tr.locate(hops) == (2, "10.0.2.1", "in-path")


def test_traceroute_has_a_deadline_of_its_own_that_covers_its_pauses():
    from probes.context import ProbeContext
    from probes.runner import experiments
    from probes.timeouts import Timeouts

    ctx = ProbeContext(timeouts=Timeouts())
    (experiment,) = experiments("traceroute")
    assert experiment.deadline is tr.deadline and tr.deadline(ctx) > ctx.timeouts.measurement
    ctx.packet = {"pause": 90.0}
    assert tr.deadline(ctx) > 3 * 2 * tr.MAX_TTL * 90.0  # every pause of every run fits
    assert experiments("web")[0].deadline is None


def test_censor_asn_from_the_geolocation_database_else_null(tmp_path, monkeypatch):
    import gzip
    import shutil

    from shared import shared_path

    src = shared_path("data", "ipdb", "asn.mmdb.gz").parent
    for kind in ("asn", "country"):
        with gzip.open(src / f"{kind}.mmdb.gz") as fin, open(tmp_path / f"{kind}.mmdb", "wb") as fout:
            shutil.copyfileobj(fin, fout)
    monkeypatch.setenv("VANTAGE_GEO_DB", str(tmp_path))
    assert tr._asn("8.8.8.8") == "AS15169"
    assert tr._asn("10.0.0.1") is None  # private: the database's AS0
    assert tr._asn(None) is None
    monkeypatch.setenv("VANTAGE_GEO_DB", str(tmp_path / "missing"))
    assert tr._asn("8.8.8.8") is None


def test_capture_over_ipv6_loopback_reads_the_hop_limit():
    """A raw IPv6 socket with the kernel filter: the SYN-ACK of a connection to
    ::1 arrives with hop limit 64 and no IP ID (root only)."""
    require_root()
    import asyncio

    from probes import capture

    class Ctx:
        packet = {"capture": True}

    async def main():
        async def handle(reader, writer):
            await reader.read(5)
            writer.close()

        server = await asyncio.start_server(handle, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        keys: dict = {}
        cap = capture.start(Ctx(), ["::1"], port, None)
        assert cap is not None and socket.AF_INET6 in cap.hubs
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"hello")
        await reader.read()
        writer.close()
        await asyncio.sleep(0.2)
        await capture.stop(cap, keys)
        server.close()
        return keys

    keys = asyncio.run(main())
    syn_ack = [r for r in keys["x_packets"] if r["kind"] == "syn_ack"]
    assert len(syn_ack) == 1 and syn_ack[0]["src"] == "::1" and syn_ack[0]["ip_ttl"] == 64
    assert syn_ack[0]["ip_id"] is None and syn_ack[0]["flow"].startswith("[::1]:")


def test_capture_asked_for_without_privileges_is_one_note_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from cli import main

    monkeypatch.setattr(packets, "have_privileges", lambda: False)
    monkeypatch.setenv("VANTAGE_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setattr(sys, "argv", ["vantage", "run", "web", "--capture", "--yes", "--quiet", "--url",
                                      "http://127.0.0.1:9/", "--db", str(tmp_path / "x.duckdb"), "--no-doh",
                                      "--probe-cc", "ZZ", "--probe-asn", "AS0"])
    monkeypatch.setattr(sys, "argv", sys.argv + ["--json"])
    try:
        main.main()
    except SystemExit as exited:
        assert exited.code in (0, None)
    out, err = capsys.readouterr()
    assert len([line for line in err.splitlines() if "packet capture" in line]) == 1, err
    summary = json.loads(out)
    assert summary[0]["measured"] == 1 and summary[0]["status"] == "finished", summary


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

    got = _run(lab, "traceroute", URLS, "--pause", "0.2")
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
        assert line["asn"] == f"AS{plan.TRANSIT_ASN}", line  # the lab's IP-to-ASN database (lab/geodb.py)
    free = got["http://free.example/"]
    assert free["interference"] is False and free["censor_hop"] is None and free["position"] is None
    # The pauses: after each blocked probe and after each run that met interference, as asked.
    import duckdb

    con = duckdb.connect(str(lab.workdir / "traceroute.duckdb"), read_only=True)
    records = {url: json.loads(record) for url, record in con.execute("SELECT input, record FROM measurements").fetchall()}
    con.close()
    keys = records["https://tlsdrop.example/"]["test_keys"]
    assert keys["x_pause"] == 0.2
    assert [run["paused"] for run in keys["x_runs"]] == [0.2, 0.2, None]
    hops = keys["x_runs"][0]["probes"]["tls"]["hops"]
    assert [h["ttl"] for h in hops if h["paused"] == 0.2] == [h["ttl"] for h in hops[5:-1]], hops  # blocked from hop 6 on
    assert all(h["paused"] is None for h in records["http://free.example/"]["test_keys"]["x_runs"][0]["probes"]["http"]["hops"])



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


SCENARIO6 = """
name = "packet-probes-ipv6"
probe_ipv6 = "working"
[[sites]]
domain = "free6.example"
ipv6 = true
[[sites]]
domain = "reject6.example"
ipv6 = true
[[sites]]
domain = "down6.example"
behaviour = "down"
ipv6 = true
[[censor]]
action = "ip-reject"
domain = "reject6.example"
family = "ipv6"
[[expect]]
url = "http://free6.example/"
status = "ok"
"""


@pytest.fixture(scope="module")
def lab6():
    require_root("ip", "iptables", "ip6tables", "tc")
    from lab.runner import ScenarioLab
    from lab.scenario import parse_text

    with ScenarioLab(parse_text(SCENARIO6, "packet-probes-ipv6.toml")) as slab:
        yield slab


def _web(lab, db, *extra: str) -> list[tuple]:
    import duckdb

    from lab import plan
    from lab.runner import VANTAGE

    argv = [*VANTAGE, "run", "web", "--yes", "--quiet", "--db", str(db), "--resolver", plan.PUBLIC_RESOLVER, "--no-doh",
            "--probe-cc", "ZZ", "--probe-asn", "AS0", "--helper", plan.HELPER_URL, "--ca-file", str(lab.ca.cert_path), *extra]
    for network in plan.PUBLIC_NETWORKS:
        argv += ["--public-network", network]
    for url in ("http://reject6.example/", "http://down6.example/", "http://free6.example/"):
        argv += ["--url", url]
    proc = lab.lab.run("probe", argv, timeout=240, env=lab._child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT m.domain, p.kind, p.src, p.ip_ttl, p.ip_id, p.baseline_ttl, p.injected FROM packets p "
                       "JOIN measurements m USING (measurement_id)").fetchall()
    con.close()
    return rows


@pytest.mark.lab
def test_capture_is_on_by_default_and_reads_ipv6_hop_limits(lab6):
    """No --capture: a privileged run captures. Over IPv6 the censor's RSTs
    (ip-reject, one hop nearer than the server) are injected and a closed
    port's RSTs (the server's own) genuine, by hop limit; --no-capture keeps nothing."""
    rows = _web(lab6, lab6.workdir / "capture6.duckdb")
    v6 = {}
    for domain, kind, src, ttl, ip_id, baseline, injected in rows:
        if ":" in src:
            assert ip_id is None
            v6.setdefault((domain, kind), []).append((ttl, baseline, injected))
    assert v6[("reject6.example", "rst")] and all(i is True for _, _, i in v6[("reject6.example", "rst")]), v6
    assert v6[("down6.example", "rst")] and all(i is False for _, _, i in v6[("down6.example", "rst")]), v6
    assert v6[("free6.example", "syn_ack")], v6
    assert all(i is False for (d, k), v in v6.items() if d == "free6.example" and k != "syn_ack" for _, _, i in v), v6
    # The censor is one hop nearer: its RSTs arrive with one more hop left than the server's packets.
    assert {t - b for t, b, _ in v6[("reject6.example", "rst")]} == {1}, v6
    from lab.runner import analyze_db

    verdicts = analyze_db(lab6.workdir / "capture6.duckdb", lab6.geo_dir)
    assert verdicts["http://down6.example/"]["web_connectivity"]["status"] == "down"
    assert _web(lab6, lab6.workdir / "nocapture6.duckdb", "--no-capture") == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_capture_filter_past_its_cap_keeps_the_newest_measurements_servers(monkeypatch):
    """More servers measured at once than the kernel program names (50
    workers with 8 addresses each): each new measurement's servers are in the
    filter, and a measurement whose servers are already there re-attaches
    nothing."""
    from probes import capture

    attached = []
    monkeypatch.setattr(capture, "attach", lambda sock, program, drain=True: attached.append(program))
    hub = object.__new__(capture._Hub)
    hub.family, hub.owner, hub.active, hub.filtered, hub.sock = socket.AF_INET, {}, {}, [], None
    hub.program = lambda ips, *args, **kwargs: list(ips)
    for n in range(capture.MAX_ADDRESSES // 8 + 10):  # well past the cap
        mine = [f"198.18.{n}.{k}" for k in range(1, 9)]
        hub.want(mine)
        assert set(mine) <= set(hub.filtered) and len(hub.filtered) <= capture.MAX_ADDRESSES
    before = len(attached)
    hub.want(mine)  # the same servers again: the program already names them
    assert len(attached) == before
