"""The on-path censor (lab/censor.py, lab/dpi.py, lab/mitm.py).

Unit tests of the packet parsers and forgers run anywhere. The lab tests build
client ns ── censor ns ── server ns (tests/labnet.py), start one Censor with
a rule of every on-path action, each for its own domain, and check from the
client what each action looks like on the wire — and that a domain without a
rule, on the same server address, is untouched."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from scapy.layers.inet import IP, TCP, UDP

from lab import dpi
from lab.censor import DROP_MARK, Censor, CensorError
from lab.pki import CA
from lab.scenario import CensorRule

import labnet
from rootonly import require_root

# ---------------------------------------------------------------------------
# Unit tests: parsers, forgers, decisions, generated rules


def client_hello(sni: str) -> bytes:
    """A real ClientHello as Python's TLS stack writes it."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def tcp_packet(payload: bytes, dport: int, seq=1000, ack=5000) -> bytes:
    return bytes(IP(src="198.18.2.1", dst="198.18.100.1") / TCP(sport=40000, dport=dport, seq=seq, ack=ack, flags="PA") / payload)


def test_parse_sni_from_real_client_hello():
    hello = client_hello("video.example")
    assert dpi.parse_sni(hello) == "video.example"
    # Truncation after the extension still works; garbage never raises.
    assert dpi.parse_sni(hello[:200]) == "video.example"
    assert dpi.parse_sni(hello[:30]) is None
    assert dpi.parse_sni(b"GET / HTTP/1.1\r\n") is None


def test_parse_http_host():
    assert dpi.parse_http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: News.Example:8080\r\n\r\n") == "news.example"
    assert dpi.parse_http_host(b"POST /a HTTP/1.0\r\nHost: a.example\r\n") == "a.example"
    assert dpi.parse_http_host(b"\x16\x03\x01 not http") is None
    assert dpi.parse_http_host(b"GET / HTTP/1.1\r\n\r\n") is None


def test_matches_covers_subdomains_only():
    assert dpi.matches("www.news.example.", "news.example")
    assert dpi.matches("NEWS.example", "news.example")
    assert not dpi.matches("fakenews.example", "news.example")
    assert not dpi.matches(None, "news.example")


def test_inspector_never_raises_on_garbage():
    inspector = dpi.Inspector([dpi.Rule("tls-reset", "x.example"), dpi.Rule("dns-drop", "x.example")], DROP_MARK)
    rng = random.Random(7)
    for _ in range(2000):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
        assert inspector.decide(raw).verdict == "accept"
    for dport in (53, 80, 443):
        for proto in (TCP(dport=dport), UDP(dport=dport)):
            blob = bytes(IP(src="198.18.2.1", dst="198.18.3.2") / proto / bytes(rng.getrandbits(8) for _ in range(60)))
            inspector.decide(blob)


def test_decisions_and_forged_sequence_numbers():
    rules = [dpi.Rule("http-reset", "reset.example"), dpi.Rule("http-blockpage", "page.example", page="Nope", status=451),
             dpi.Rule("tls-drop", "drop.example"), dpi.Rule("throttle", "slow.example", mark=0x7610),
             dpi.Rule("dns-inject", "inj.example", answer="198.18.250.7"), dpi.Rule("dns-drop", "gone.example")]
    inspector = dpi.Inspector(rules, DROP_MARK, hold_ms=80)
    request = b"GET / HTTP/1.1\r\nHost: reset.example\r\n\r\n"
    d = inspector.decide(tcp_packet(request, 80))
    assert d.mark == DROP_MARK and len(d.inject) == 2
    to_client, to_server = (IP(b) for b in d.inject)
    assert (to_client.src, to_client.dst, to_client[TCP].seq, to_client[TCP].ack) == ("198.18.100.1", "198.18.2.1", 5000, 1000 + len(request))
    assert "R" in str(to_client[TCP].flags) and to_server[TCP].seq == 1000 and to_server.dst == "198.18.100.1"

    d = inspector.decide(tcp_packet(b"GET / HTTP/1.1\r\nHost: page.example\r\n\r\n", 80))
    segments = [IP(b) for b in d.inject]
    body = b"".join(bytes(s[TCP].payload) for s in segments[:-2])
    assert body.startswith(b"HTTP/1.1 451 ") and b"Nope" in body
    assert "F" in str(segments[-2][TCP].flags) and segments[-2][TCP].seq == 5000 + len(body)
    assert "R" in str(segments[-1][TCP].flags)

    assert inspector.decide(tcp_packet(client_hello("drop.example"), 443)).mark == DROP_MARK
    assert inspector.decide(tcp_packet(client_hello("slow.example"), 443)).mark == 0x7610
    assert inspector.decide(tcp_packet(b"GET / HTTP/1.1\r\nHost: www.slow.example\r\n\r\n", 80)).mark == 0x7610
    assert inspector.decide(tcp_packet(client_hello("other.example"), 443)).mark is None

    query = dns.message.make_query("inj.example", "A")
    raw = bytes(IP(src="198.18.2.1", dst="198.18.53.1") / UDP(sport=5353, dport=53) / query.to_wire())
    d = inspector.decide(raw)
    assert d.hold_ms == 80 and d.verdict == "accept"
    forged = IP(d.inject[0])
    assert (forged.src, forged.dst, forged[UDP].sport, forged[UDP].dport) == ("198.18.53.1", "198.18.2.1", 53, 5353)
    answer = dns.message.from_wire(bytes(forged[UDP].payload))
    assert answer.id == query.id and answer.answer[0][0].address == "198.18.250.7"

    gone = bytes(IP(src="198.18.2.1", dst="198.18.53.8") / UDP(sport=5353, dport=53) / dns.message.make_query("gone.example", "A").to_wire())
    assert inspector.decide(gone).verdict == "drop"
    wire = dns.message.make_query("gone.example", "A").to_wire()
    assert inspector.decide(tcp_packet(len(wire).to_bytes(2, "big") + wire, 53)).mark == DROP_MARK


def test_censor_validates_rules(tmp_path):
    ca = CA("rogue", tmp_path)
    with pytest.raises(CensorError, match="rate_kbit"):
        Censor("ns", [CensorRule("throttle", "a.example", line=3)], {}, tmp_path, ca)
    with pytest.raises(CensorError, match="unknown"):
        Censor("ns", [CensorRule("teleport", "a.example")], {}, tmp_path, ca)
    censor = Censor("ns", [CensorRule("ip-blackhole", "a.example")], {}, tmp_path, ca)
    with pytest.raises(CensorError, match="no addresses"):
        censor.iptables_rules()


def test_censor_queues_only_what_it_needs(tmp_path):
    ca = CA("rogue", tmp_path)
    only_ip = Censor("ns", [CensorRule("ip-reject", ip="198.18.100.9")], {}, tmp_path, ca).iptables_rules()
    assert "NFQUEUE" not in only_ip and "-d 198.18.100.9/32 -p tcp --syn -j REJECT --reject-with tcp-reset" in only_ip
    http = Censor("ns", [CensorRule("http-reset", "a.example")], {}, tmp_path, ca).iptables_rules()
    assert "--dport 80" in http and "--dport 443" not in http and "udp" not in http
    assert "connbytes" in http


def tcp6_packet(payload: bytes, dport: int, seq=1000, ack=5000) -> bytes:
    from scapy.layers.inet6 import IPv6

    return bytes(IPv6(src="2001:2:0:2::1", dst="2001:2:0:100::1") / TCP(sport=40000, dport=dport, seq=seq, ack=ack, flags="PA") / payload)


def test_ipv6_packets_parse_decide_and_forge_as_ipv6():
    from scapy.layers.inet6 import IPv6

    p = dpi.parse_ip(tcp6_packet(b"GET / HTTP/1.1\r\nHost: Reset.Example\r\n\r\n", 80, seq=7, ack=9))
    assert (p.version, p.src, p.dst, p.dport, p.seq, p.ack) == (6, "2001:2:0:2::1", "2001:2:0:100::1", 80, 7, 9)
    inspector = dpi.Inspector([dpi.Rule("http-reset", "reset.example"), dpi.Rule("tls-reset", "v4only.example", family="ipv4"),
                               dpi.Rule("tls-drop", "v6only.example", family="ipv6")], drop_mark=DROP_MARK)
    d = inspector.decide(tcp6_packet(b"GET / HTTP/1.1\r\nHost: reset.example\r\n\r\n", 80, seq=7, ack=9))
    assert d.mark == DROP_MARK and len(d.inject) == 2
    to_client = IPv6(d.inject[0])
    assert (to_client.src, to_client.dst, to_client[TCP].flags, to_client[TCP].seq) == ("2001:2:0:100::1", "2001:2:0:2::1", "RA", 9)
    # A rule's family: IPv4-only rules pass IPv6 packets, and the other way round.
    assert inspector.decide(tcp6_packet(client_hello("v4only.example"), 443)).mark is None
    assert inspector.decide(tcp_packet(client_hello("v4only.example"), 443)).mark == DROP_MARK
    assert inspector.decide(tcp6_packet(client_hello("v6only.example"), 443)).mark == DROP_MARK
    assert inspector.decide(tcp_packet(client_hello("v6only.example"), 443)).mark is None
    # Truncated or extension-header packets are not judged.
    assert dpi.parse_ip(tcp6_packet(b"x", 80)[:50]) is None
    assert dpi.parse_ip(bytes(IPv6(src="2001:2::1", dst="2001:2::2", nh=0)) + b"\x06\x00" + b"\x00" * 30) is None


def test_ipv6_dns_injection_answers_in_kind():
    from scapy.layers.inet6 import IPv6

    query = dns.message.make_query("inject.test", "AAAA")
    wire = bytes(IPv6(src="2001:2:0:2::1", dst="2001:2:0:53::1") / UDP(sport=5353, dport=53) / query.to_wire())
    v6 = dpi.Inspector([dpi.Rule("dns-inject", "inject.test", answer="2001:2::bad")], drop_mark=DROP_MARK).decide(wire)
    forged = IPv6(v6.inject[0])
    answer = dns.message.from_wire(bytes(forged[UDP].payload))
    assert forged.src == "2001:2:0:53::1" and [r.to_text() for rr in answer.answer for r in rr] == ["2001:2::bad"]
    # An IPv4 answer forges nothing for an AAAA query.
    assert not dpi.Inspector([dpi.Rule("dns-inject", "inject.test", answer="198.18.250.7")], drop_mark=DROP_MARK).decide(wire).inject


def test_censor_writes_each_family_its_own_ruleset(tmp_path):
    ca = CA("rogue", tmp_path)
    sites = {"dual.example": ["198.18.100.1", "2001:2:0:100::1"], "other.example": ["198.18.100.2", "2001:2:0:100::2"]}
    rules = [CensorRule("ip-blackhole", "dual.example", family="ipv6"), CensorRule("ip-reject", "other.example"),
             CensorRule("tls-mitm", "other.example"), CensorRule("http-reset", "dual.example", family="ipv4")]
    censor = Censor("ns", rules, sites, tmp_path, ca, ipv6=True)
    assert censor.versions == (4, 6)
    v4, v6 = censor.iptables_rules(4), censor.iptables_rules(6)
    assert "-d 2001:2:0:100::1/128 -j DROP" in v6 and "198.18.100.1/32 -j DROP" not in v4 and "2001:2" not in v4
    assert "-d 198.18.100.2/32 -p tcp --syn -j REJECT" in v4 and "-d 2001:2:0:100::2/128 -p tcp --syn -j REJECT" in v6
    assert "-d 2001:2:0:100::2/128 -p tcp --dport 443 -j REDIRECT" in v6
    assert "--dport 80" in v4 and "--dport 80" not in v6  # the http rule is IPv4-only
    assert Censor("ns", rules, sites, tmp_path, ca).versions == (4,)


def test_flaky_rules_and_geo_database(tmp_path):
    import maxminddb

    from lab import geodb, plan
    from lab.runner import FLAKY_MARK, flaky_rules
    from lab.scenario import parse_text
    from lab.sites import assign_addresses

    sc = parse_text("""name = "x"\nprobe_ipv6 = "working"\n[[sites]]\ndomain = "f.example"\nbehaviour = "flaky"\nloss = 0.25\nipv6 = true
[[sites]]\ndomain = "c.example"\ncdn = true\naddresses = 2\nipv6 = true\n[[sites]]\ndomain = "g.example"\ngeo_dns = true
[[expect]]\nurl = "https://f.example/"\nstatus = "ok"\n""", "x.toml")
    default, control = assign_addresses(sc)
    assert default["f.example"] == ["198.18.100.1", "2001:2:0:100::1"]
    assert default["c.example"][:2] == ["198.18.120.1", "198.18.120.2"] and control["c.example"][2:] == ["2001:2:0:121::1", "2001:2:0:121::2"]
    v4, v6 = flaky_rules(sc, default, control, 4), flaky_rules(sc, default, control, 6)
    assert "-d 198.18.100.1 -p tcp --syn -m conntrack --ctstate NEW -m statistic --mode random --probability 0.2500" in v4
    assert "2001:2:0:100::1" in v6 and "198.18" not in v6 and f"-A OUTPUT -m connmark --mark {FLAKY_MARK:#x} -j DROP" in v4
    geo = geodb.write(tmp_path / "geo", default, control, {"c.example"})
    with maxminddb.open_database(str(geo / "asn.mmdb")) as db:
        asn = lambda ip: db.get(ip)["autonomous_system_number"]  # noqa: E731
        assert {asn(a) for a in default["c.example"] + control["c.example"]} == {plan.CDN_ASN}
        assert asn(default["g.example"][0]) == asn(control["g.example"][0]) != plan.CDN_ASN
        assert asn("198.18.1.2") == plan.PROBE_ASN and asn("2001:2:0:4::2") == plan.CONTROL_ASN
        assert db.get("192.0.2.1") is None
    from probes.geo import GeoDB

    with GeoDB(geo) as both:
        assert both.lookup("2001:2:0:120::1") == (plan.GEO_CC, f"AS{plan.CDN_ASN}", plan.CDN_ORG)


# ---------------------------------------------------------------------------
# Lab tests

DOMAINS = {
    "open": "open.test", "inject": "inject.test", "dnsdrop": "dnsdrop.test", "reset": "reset.test",
    "page": "blockpage.test", "tlsreset": "tlsreset.test", "tlsdrop": "tlsdrop.test", "slow": "slow.test",
    "blackhole": "blackhole.test", "reject": "reject.test", "mitm": "mitm.test",
}
SHARED, BLACKHOLE, REJECT, MITM = labnet.SITE_ADDRESSES[0], labnet.SITE_ADDRESSES[2], labnet.SITE_ADDRESSES[3], labnet.SITE_ADDRESSES[4]
GENUINE = SHARED
FORGED = "198.18.250.7"
PAGE = "Access restricted by decision of the regulator."
RATE_KBIT = 256


class Servers:
    """DNS (UDP and TCP) and HTTP/HTTPS servers on sockets made in the server
    namespace, served by threads of this process."""

    def __init__(self, ns: str, lab_ca: CA, tmp: Path):
        self.ns = ns
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        cert, key = lab_ca.issue(list(DOMAINS.values()), tmp / "site-certs", stem="sites")
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.threads = [threading.Thread(target=self._dns_udp, daemon=True),
                        threading.Thread(target=self._dns_tcp, daemon=True),
                        threading.Thread(target=self._web, daemon=True)]
        self.web_ready = threading.Event()

    def _sock(self, kind: int, addr: str, port: int) -> socket.socket:
        s = labnet.socket_in(self.ns, socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        s.settimeout(0.2)
        self.sockets.append(s)
        return s

    @staticmethod
    def answer(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        if query.question[0].rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", GENUINE))
        return response.to_wire()

    def _dns_udp(self) -> None:
        s = self._sock(socket.SOCK_DGRAM, labnet.DNS_ADDRESS, 53)
        while not self.stop.is_set():
            try:
                wire, peer = s.recvfrom(4096)
                s.sendto(self.answer(wire), peer)
            except (TimeoutError, OSError, dns.exception.DNSException):
                continue

    def _dns_tcp(self) -> None:
        s = self._sock(socket.SOCK_STREAM, labnet.DNS_ADDRESS, 53)
        while not self.stop.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            # One thread per connection: a query the censor drops must not
            # stall the next client.
            threading.Thread(target=self._dns_tcp_conn, args=(conn,), daemon=True).start()

    def _dns_tcp_conn(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                length = int.from_bytes(conn.recv(2), "big")
                wire = b""
                while len(wire) < length:
                    wire += conn.recv(length - len(wire))
                out = self.answer(wire)
                conn.sendall(len(out).to_bytes(2, "big") + out)
            except (OSError, ValueError, dns.exception.DNSException):
                pass

    def _web(self) -> None:
        from aiohttp import web

        async def upload(request: web.Request) -> web.Response:
            # Timed here, at the receiver: the client's send buffer would hide the shaping.
            start, size = time.monotonic(), 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
            return web.json_response({"bytes": size, "seconds": time.monotonic() - start})

        async def page(request: web.Request) -> web.Response:
            if request.path == "/big":
                return web.Response(body=b"x" * int(request.query.get("n", "1000000")))
            return web.Response(text=f"<html>genuine page of {request.host}</html>")

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/upload", upload)
            app.router.add_get("/{tail:.*}", page)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            for addr in labnet.SITE_ADDRESSES:
                for port, ctx in ((80, None), (443, self.tls)):
                    sock = self._sock(socket.SOCK_STREAM, addr, port)
                    sock.setblocking(False)
                    await web.SockSite(runner, sock, ssl_context=ctx).start()
            self.web_ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
            await runner.cleanup()

        asyncio.run(serve())

    def start(self) -> None:
        for t in self.threads:
            t.start()
        assert self.web_ready.wait(10), "web servers did not start"

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for s in self.sockets:
            s.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require_root("ip", "iptables", "iptables-restore", "tc")
    tmp = tmp_path_factory.mktemp("censor")
    lab_ca, rogue_ca = CA.create("lab", tmp / "ca"), CA.create("rogue", tmp / "ca", "Regulator Inspection CA")
    rules = [
        CensorRule("dns-inject", DOMAINS["inject"], answer=FORGED),
        CensorRule("dns-drop", DOMAINS["dnsdrop"]),
        CensorRule("ip-blackhole", DOMAINS["blackhole"]),
        CensorRule("ip-reject", DOMAINS["reject"]),
        CensorRule("http-reset", DOMAINS["reset"]),
        CensorRule("http-blockpage", DOMAINS["page"], page=PAGE, status=451),
        CensorRule("tls-reset", DOMAINS["tlsreset"]),
        CensorRule("tls-drop", DOMAINS["tlsdrop"]),
        CensorRule("tls-mitm", DOMAINS["mitm"]),
        CensorRule("throttle", DOMAINS["slow"], rate_kbit=RATE_KBIT),
    ]
    addresses = {d: [SHARED] for d in DOMAINS.values()}
    addresses.update({DOMAINS["blackhole"]: [BLACKHOLE], DOMAINS["reject"]: [REJECT], DOMAINS["mitm"]: [MITM]})
    net = labnet.LabNet()
    servers = censor = None
    try:
        net.up()
        servers = Servers(net.server, lab_ca, tmp)
        servers.start()
        censor = Censor(net.censor, rules, addresses, tmp / "censor", rogue_ca)
        censor.start()
        yield {"net": net, "censor": censor, "lab_ca": lab_ca, "rogue_ca": rogue_ca, "tmp": tmp}
    finally:
        if censor is not None:
            censor.stop()
        if servers is not None:
            servers.close()
        net.down()


def client_sock(lab, kind=socket.SOCK_STREAM, timeout=2.0) -> socket.socket:
    s = labnet.socket_in(lab["net"].client, socket.AF_INET, kind)
    s.settimeout(timeout)
    return s


def dns_udp(lab, name: str, server=labnet.DNS_ADDRESS, wait=1.0) -> list[tuple[float, list[str]]]:
    """Every response to one query that arrives within ``wait`` seconds."""
    query = dns.message.make_query(name, "A")
    got = []
    with client_sock(lab, socket.SOCK_DGRAM) as s:
        start = time.monotonic()
        s.sendto(query.to_wire(), (server, 53))
        while (left := wait - (time.monotonic() - start)) > 0:
            s.settimeout(left)
            try:
                wire, _ = s.recvfrom(4096)
            except TimeoutError:
                break
            msg = dns.message.from_wire(wire)
            assert msg.id == query.id and msg.question == query.question
            got.append((time.monotonic() - start, [rr.address for rrset in msg.answer for rr in rrset]))
    return got


def dns_tcp(lab, name: str) -> list[str]:
    wire = dns.message.make_query(name, "A").to_wire()
    with client_sock(lab, timeout=1.5) as s:
        s.connect((labnet.DNS_ADDRESS, 53))
        s.sendall(len(wire).to_bytes(2, "big") + wire)
        length = int.from_bytes(s.recv(2), "big")
        msg = dns.message.from_wire(s.recv(length))
    return [rr.address for rrset in msg.answer for rr in rrset]


def http_get(lab, addr: str, host: str, path="/", timeout=2.0) -> bytes:
    with client_sock(lab, timeout=timeout) as s:
        s.connect((addr, 80))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def tls_handshake(lab, addr: str, sni: str, verify_with: CA | None = None, timeout=2.0) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify_with is None:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        ctx.load_verify_locations(verify_with.cert_path)
    s = client_sock(lab, timeout=timeout)
    try:
        s.connect((addr, 443))
        return ctx.wrap_socket(s, server_hostname=sni)
    except BaseException:
        s.close()
        raise


def https_get(tls: ssl.SSLSocket, host: str, path="/", deadline: float | None = None) -> tuple[bytes, float]:
    """Body-inclusive response bytes and seconds taken (stops at ``deadline`` seconds)."""
    start = time.monotonic()
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while deadline is None or time.monotonic() - start < deadline:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


@pytest.mark.lab
def test_dns_inject_answer_arrives_first_then_genuine(lab):
    answers = dns_udp(lab, DOMAINS["inject"])
    assert [a for _, a in answers] == [[FORGED], [GENUINE]], answers
    assert answers[1][0] - answers[0][0] > 0.03  # the genuine one was held back
    # Untouched name: exactly one, genuine answer.
    assert [a for _, a in dns_udp(lab, DOMAINS["open"], wait=0.5)] == [[GENUINE]]


@pytest.mark.lab
def test_dns_drop_times_out_over_udp_and_tcp(lab):
    assert dns_udp(lab, DOMAINS["dnsdrop"], wait=1.0) == []
    with pytest.raises(TimeoutError):
        dns_tcp(lab, DOMAINS["dnsdrop"])
    assert [a for _, a in dns_udp(lab, DOMAINS["open"], wait=0.5)] == [[GENUINE]]
    assert dns_tcp(lab, DOMAINS["open"]) == [GENUINE]


@pytest.mark.lab
def test_ip_blackhole_connect_times_out(lab):
    with client_sock(lab, timeout=1.0) as s, pytest.raises(TimeoutError):
        s.connect((BLACKHOLE, 443))
    assert b"genuine page" in http_get(lab, SHARED, DOMAINS["open"])


@pytest.mark.lab
def test_ip_reject_connection_refused(lab):
    with client_sock(lab) as s, pytest.raises(ConnectionRefusedError):
        s.connect((REJECT, 80))
    assert b"genuine page" in http_get(lab, SHARED, DOMAINS["open"])


@pytest.mark.lab
def test_http_reset_after_request(lab):
    with pytest.raises(ConnectionResetError):
        http_get(lab, SHARED, DOMAINS["reset"])
    response = http_get(lab, SHARED, DOMAINS["open"])
    assert response.startswith(b"HTTP/1.1 200") and b"genuine page of open.test" in response


@pytest.mark.lab
def test_http_blockpage_served_by_censor(lab):
    response = http_get(lab, SHARED, DOMAINS["page"])
    assert response.startswith(b"HTTP/1.1 451 ") and PAGE.encode() in response
    assert b"genuine" not in response
    assert b"genuine page of open.test" in http_get(lab, SHARED, DOMAINS["open"])


@pytest.mark.lab
def test_tls_reset_after_client_hello(lab):
    with pytest.raises(ConnectionResetError):
        tls_handshake(lab, SHARED, DOMAINS["tlsreset"])
    with tls_handshake(lab, SHARED, DOMAINS["open"], verify_with=lab["lab_ca"]) as tls:
        assert b"genuine page of open.test" in https_get(tls, DOMAINS["open"])[0]
    # Plain HTTP to the same name is not affected by an SNI rule.
    assert b"genuine page of tlsreset.test" in http_get(lab, SHARED, DOMAINS["tlsreset"])


@pytest.mark.lab
def test_tls_drop_handshake_times_out(lab):
    with pytest.raises(TimeoutError):
        tls_handshake(lab, SHARED, DOMAINS["tlsdrop"], timeout=1.5)
    with tls_handshake(lab, SHARED, DOMAINS["open"], verify_with=lab["lab_ca"]) as tls:
        assert tls.version()


@pytest.mark.lab
def test_tls_mitm_presents_rogue_certificate(lab):
    with tls_handshake(lab, MITM, DOMAINS["mitm"]) as tls:
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        body, _ = https_get(tls, DOMAINS["mitm"])
    rogue = x509.load_pem_x509_certificate(lab["rogue_ca"].cert_path.read_bytes())
    assert cert.issuer == rogue.subject
    assert DOMAINS["mitm"] in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert b"genuine page of mitm.test" in body  # relayed from the real site
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(lab, MITM, DOMAINS["mitm"], verify_with=lab["lab_ca"])
    # Another name on the intercepted address passes through with the real certificate.
    with tls_handshake(lab, MITM, DOMAINS["open"], verify_with=lab["lab_ca"]) as tls:
        assert b"genuine page of open.test" in https_get(tls, DOMAINS["open"])[0]


@pytest.mark.lab
def test_throttle_shapes_matching_flow_only(lab):
    # 256 kbit/s would take 30 s for 1 MB: measure the first ~4 s instead.
    with tls_handshake(lab, SHARED, DOMAINS["slow"], verify_with=lab["lab_ca"], timeout=10) as tls:
        data, seconds = https_get(tls, DOMAINS["slow"], "/big?n=1000000", deadline=4.0)
    slow_kbit = len(data) * 8 / 1000 / seconds
    with tls_handshake(lab, SHARED, DOMAINS["open"], verify_with=lab["lab_ca"], timeout=10) as tls:
        data, seconds = https_get(tls, DOMAINS["open"], "/big?n=1000000")
    assert len(data) > 1_000_000
    fast_kbit = len(data) * 8 / 1000 / seconds
    # Plain HTTP by Host header is shaped too.
    start = time.monotonic()
    with client_sock(lab, timeout=10) as s:
        s.connect((SHARED, 80))
        s.sendall(f"GET /big?n=1000000 HTTP/1.1\r\nHost: {DOMAINS['slow']}\r\n\r\n".encode())
        got = 0
        while time.monotonic() - start < 2.5 and (chunk := s.recv(65536)):
            got += len(chunk)
    http_kbit = got * 8 / 1000 / (time.monotonic() - start)
    print(f"throttled {slow_kbit:.0f} kbit/s, http {http_kbit:.0f} kbit/s, unmatched {fast_kbit:.0f} kbit/s")
    assert 0.5 * RATE_KBIT < slow_kbit < 400, slow_kbit
    assert http_kbit < 450, http_kbit
    assert fast_kbit > 10 * RATE_KBIT, fast_kbit


@pytest.mark.lab
def test_start_stop_leaves_nothing_behind(tmp_path):
    require_root("ip", "iptables", "iptables-restore", "tc")
    rules = [CensorRule("throttle", "a.test", rate_kbit=64), CensorRule("tls-mitm", "b.test"),
             CensorRule("ip-blackhole", ip="198.18.100.6")]
    with pytest.raises(RuntimeError, match="boom"), labnet.LabNet() as net:
        names = [net.client, net.censor, net.server]
        censor = Censor(net.censor, rules, {"b.test": ["198.18.100.5"]}, tmp_path, CA.create("rogue", tmp_path))
        censor.stop()  # before start: nothing to undo
        censor.start()
        children = [p.pid for p in censor._children.values()]
        assert len(children) == 2
        assert "htb" in net.exec(net.censor, "tc", "qdisc", "show", "dev", "ce-is").stdout
        censor.stop()
        censor.stop()
        assert "VTG" not in net.exec(net.censor, "iptables-save").stdout
        assert "htb" not in net.exec(net.censor, "tc", "qdisc", "show").stdout
        for pid in children:
            assert not Path(f"/proc/{pid}").exists()
        raise RuntimeError("boom")  # the fixture network must go away on failure too
    listed = labnet._run("ip", "netns", "list").stdout
    assert not any(name in listed for name in names)


def upload_kbit(lab, host: str, size: int) -> float:
    """Client-to-server rate of an HTTP upload, as the server measured it."""
    import json

    with client_sock(lab, timeout=15) as s:
        s.connect((SHARED, 80))
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        s.sendall(b"u" * size)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    report = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert report["bytes"] == size
    return size * 8 / 1000 / max(report["seconds"], 1e-3)


@pytest.mark.lab
def test_throttle_shapes_uploads_too(lab):
    slow = upload_kbit(lab, DOMAINS["slow"], 64_000)
    fast = upload_kbit(lab, DOMAINS["open"], 1_000_000)
    print(f"upload throttled {slow:.0f} kbit/s, unmatched {fast:.0f} kbit/s")
    assert slow < 400, slow
    assert fast > 10 * RATE_KBIT, fast
