"""One test per verdict rule, on hand-built records, traps included."""

from __future__ import annotations

import pytest

from analysis_fixtures import control, database, http, page, q, row, tcp, throttling, tls, verdict, web

IP = "198.18.0.10"
NEWS = page("Daily News", 20000)


def ok_https(host="news.example", ip=IP, body=NEWS, **kw):
    return web(f"https://{host}/", queries=[q(host, ip)], tcps=[tcp(ip)], tlss=[tls(ip, host)],
               requests=[http(f"https://{host}/", ip, body=body)], ctl=control(addrs=(ip,), body=NEWS, title="Daily News"), **kw)


def one(record, **kw):
    con = database([record], **kw)
    return verdict(con, record)


def test_plain_success_is_ok():
    v = one(ok_https())
    assert (v["status"], v["layer"], v["method"]) == ("ok", None, None)
    assert v["evidence"]["rule"] == "page_matches_control"
    assert v["evidence"]["fingerprint_set"].startswith(("fp-", "none"))


def test_dns_nxdomain():
    r = web("https://nx.example/", queries=[q("nx.example", failure="dns_nxdomain_error")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    assert one(r)["method"] == "dns.nxdomain"


def test_dns_bogon_but_not_public_lab_range():
    r = web("http://b.example/", queries=[q("b.example", "10.10.34.34")], tcps=[tcp("10.10.34.34", 80, "generic_timeout_error")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News", port=80))
    v = one(r)
    assert (v["status"], v["layer"], v["method"]) == ("blocked", "dns", "dns.bogon")
    # 198.18.0.0/15 is special-purpose (benchmarking): an answer there that the
    # control did not give is a bogon, unless the caller declares the range
    # public, as the lab does (database() passes 198.18.0.0/15 by default).
    lab_ip = "198.18.5.5"
    lab = web("https://lab.example/", queries=[q("lab.example", lab_ip)], tcps=[tcp(lab_ip)], tlss=[tls(lab_ip, "lab.example")],
              requests=[http("https://lab.example/", lab_ip, body=NEWS)], ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    assert one(lab)["status"] == "ok"
    assert one(lab, public_networks=[])["method"] == "dns.bogon"


@pytest.mark.parametrize("answer", [
    "192.88.99.1",            # 6to4 relay anycast: special-purpose, once missing from the analysis's table
    "fd00::1",                # unique-local IPv6
    "::ffff:10.0.0.1",        # IPv4-mapped, dotted
    "::ffff:a00:1",           # IPv4-mapped, hex: the same address
    "64:ff9b::a00:1",         # NAT64 of 10.0.0.1
    "2002:a00:1::1",          # 6to4 of 10.0.0.1
])
def test_dns_bogon_in_any_spelling(answer):
    r = web("http://b6.example/", queries=[q("b6.example", answer)], tcps=[tcp(answer, 80, "generic_timeout_error")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News", port=80))
    v = one(r)
    assert (v["status"], v["method"]) == ("blocked", "dns.bogon")
    assert v["evidence"]["compared"]["bogon"] == answer


def test_public_ipv6_network_is_not_a_bogon():
    # 2001:2::/48 (IPv6 benchmarking) is the lab's IPv6 range: public when declared so.
    v6 = "2001:2::5"
    r = web("https://six.example/", queries=[q("six.example", v6)], tcps=[tcp(v6)], tlss=[tls(v6, "six.example")],
            requests=[http("https://six.example/", v6, body=NEWS)], ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    assert one(r, public_networks=["198.18.0.0/15"])["method"] == "dns.bogon"
    assert one(r, public_networks=["198.18.0.0/15", "2001:2::/48"])["status"] == "ok"


def test_dns_injected_late_duplicate():
    r = web("https://inj.example/", queries=[q("inj.example", "198.18.250.7", engine="udp", txid=900),
                                           q("inj.example", IP, engine="udp", txid=900, index=1),
                                           q("inj.example", "198.18.250.7")],
            tcps=[tcp("198.18.250.7", 443, "generic_timeout_error")], ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    v = one(r)
    assert (v["layer"], v["method"]) == ("dns", "dns.injected")
    assert v["evidence"]["compared"]["late_response"] == IP


def test_dns_timeout():
    r = web("https://drop.example/", queries=[q("drop.example", failure="dns_temporary_failure"),
                                            q("drop.example", engine="udp", failure="generic_timeout_error")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), network_ok=False)
    online = ok_https()  # same run, same minute: the probe was online
    con = database([r, online])
    assert (verdict(con, r)["layer"], verdict(con, r)["method"]) == ("dns", "dns.timeout")


def test_dns_inconsistent_unvouched_address_then_failure():
    r = web("https://x.example/", queries=[q("x.example", "198.18.99.9")], tcps=[tcp("198.18.99.9")],
            tlss=[tls("198.18.99.9", "x.example", failure="connection_reset")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    assert one(r)["method"] == "dns.inconsistent"


def test_cdn_geo_answer_with_valid_certificate_is_ok():
    # the probe's resolver gives another (valid) CDN node than the control's
    r = web("https://cdn.example/", queries=[q("cdn.example", "198.18.7.7", "198.18.7.8")],
            tcps=[tcp("198.18.7.7"), tcp("198.18.7.8", failure="generic_timeout_error")],
            tlss=[tls("198.18.7.7", "cdn.example")],
            requests=[http("https://cdn.example/", "198.18.7.7", body=NEWS)],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    assert one(r)["status"] == "ok"


def test_tcp_reset_and_timeout():
    refused = web("http://r.example/", queries=[q("r.example", IP)], tcps=[tcp(IP, 80, "connection_refused")],
                  ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    dropped = web("https://h.example/", queries=[q("h.example", IP)], tcps=[tcp(IP, 443, "generic_timeout_error")],
                  ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    con = database([refused, dropped])
    assert verdict(con, refused)["method"] == "tcp.reset"
    assert verdict(con, dropped)["method"] == "tcp.timeout"


@pytest.mark.parametrize("failure,method", [("connection_reset", "tls.reset"), ("eof_error", "tls.reset"),
                                            ("generic_timeout_error", "tls.timeout")])
def test_tls_interference(failure, method):
    r = web("https://s.example/", queries=[q("s.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "s.example", failure=failure)],
            requests=[http("https://s.example/", None, status=None, body=None, failure=failure)],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    v = one(r)
    assert (v["status"], v["layer"], v["method"]) == ("blocked", "tls", method)


def test_tls_mitm():
    r = web("https://m.example/", queries=[q("m.example", IP)], tcps=[tcp(IP)],
            tlss=[tls(IP, "m.example", failure="ssl_unknown_authority", valid=False, issuer="CN=Rogue")],
            requests=[http("https://m.example/", None, status=None, body=None, failure="ssl_unknown_authority")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    v = one(r)
    assert v["method"] == "tls.mitm" and v["confidence"] >= 0.85
    assert v["evidence"]["compared"]["issuer"] == "CN=Rogue"


def test_certificate_invalid_for_everyone_is_down():
    r = web("https://bad.example/", queries=[q("bad.example", IP)], tcps=[tcp(IP)],
            tlss=[tls(IP, "bad.example", failure="ssl_invalid_certificate", valid=False)],
            ctl=control(addrs=(IP,), tls_ok={IP: "ssl_invalid_certificate"}, http_failure="ssl_invalid_certificate"))
    assert one(r)["status"] == "down"


def test_http_reset_and_timeout_on_plain_http():
    reset = web("http://hr.example/", queries=[q("hr.example", IP)], tcps=[tcp(IP, 80)],
                requests=[http("http://hr.example/", IP, status=None, body=None, failure="connection_reset")],
                ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    slow = web("http://ht.example/", queries=[q("ht.example", IP)], tcps=[tcp(IP, 80)],
               requests=[http("http://ht.example/", IP, status=None, body=None, failure="generic_timeout_error")],
               ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    con = database([reset, slow])
    assert verdict(con, reset)["method"] == "http.reset"
    assert verdict(con, slow)["method"] == "http.timeout"


def test_https_of_http_reset_site_is_ok():
    # A censor resets plain-HTTP requests naming the host; the same site over
    # HTTPS, in the same run, arrives: only the HTTP measurement is blocked.
    host = "host-reset.example"
    plain = web(f"http://{host}/", queries=[q(host, IP)], tcps=[tcp(IP, 80)],
                requests=[http(f"http://{host}/", IP, status=None, body=None, failure="connection_reset")],
                ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    secure = ok_https(host)
    con = database([plain, secure])
    assert verdict(con, plain)["method"] == "http.reset"
    v = verdict(con, secure)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "page_matches_control")


def test_blockpage_diff_without_fingerprint():
    body = "<html><body>Access to this resource has been restricted by decision of the regulator.</body></html>"
    r = web("http://bp.example/", queries=[q("bp.example", IP)], tcps=[tcp(IP, 80)],
            requests=[http("http://bp.example/", IP, body=body)],
            ctl=control(addrs=(IP,), port=80, body=page("Citizen Journalism", 30000), title="Citizen Journalism"))
    v = one(r, fingerprints_dir="/nonexistent")
    assert (v["status"], v["layer"], v["method"], v["confirmed"]) == ("blocked", "http", "http.diff", False)
    assert v["evidence"]["fingerprint_set"] == "none"


def test_blockpage_fingerprint_confirms(tmp_path):
    (tmp_path / "blockpage_signatures.json").write_text('{"fingerprint": "t_lab", "pattern": "restricted by decision of the regulator"}\n')
    (tmp_path / "false_positive_signatures.json").write_text('{"fingerprint": "fp_nginx", "pattern": "Welcome to nginx"}\n')
    body = "<html><body>Access to this resource has been restricted by decision of the regulator.</body></html>"
    r = web("http://bp.example/", queries=[q("bp.example", IP)], tcps=[tcp(IP, 80)],
            requests=[http("http://bp.example/", IP, body=body)],
            ctl=control(addrs=(IP,), port=80, body=page("Citizen Journalism", 30000), title="Citizen Journalism"))
    fp_page = web("http://fp.example/", queries=[q("fp.example", IP)], tcps=[tcp(IP, 80)],
                  requests=[http("http://fp.example/", IP, body="<h1>Welcome to nginx</h1> restricted by decision of the regulator")],
                  ctl=control(addrs=(IP,), port=80, body=page("Citizen Journalism", 30000), title="Citizen Journalism"))
    con = database([r, fp_page], fingerprints_dir=tmp_path)
    v = verdict(con, r)
    assert (v["method"], v["confirmed"]) == ("http.blockpage", True)
    assert v["evidence"]["compared"]["fingerprint"] == "censoredplanet:t_lab"
    # the false-positive signature is checked first: no confirmed blockpage
    assert verdict(con, fp_page)["confirmed"] is False


def test_https_403_with_valid_certificate_is_server_side():
    r = web("https://geo.example/", queries=[q("geo.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "geo.example")],
            requests=[http("https://geo.example/", IP, status=403, body=page("Forbidden", 300))],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    v = one(r)
    assert v["status"] == "server_side" and v["layer"] is None


@pytest.mark.parametrize("c_status, c_title", [(403, "Forbidden"), (503, "Service Unavailable"), (200, "Other Title")])
def test_validated_https_against_a_refused_control_is_ok(c_status, c_title):
    # Many sites refuse data-centre addresses, where helpers live: the control
    # got 403/503 (or another page), the probe got the page over validated
    # TLS. Only the probe's refusal counts as blocking.
    host = "refuses-dc.example"
    r = web(f"https://{host}/", queries=[q(host, IP)], tcps=[tcp(IP)], tlss=[tls(IP, host)],
            requests=[http(f"https://{host}/", IP, body=NEWS)],
            ctl=control(addrs=(IP,), status=c_status, body=page(c_title, 400), title=c_title))
    v = one(r)
    assert (v["status"], v["layer"], v["method"]) == ("ok", None, None), v
    assert v["evidence"]["rule"] == "validated_https_page"


def test_plain_http_against_a_refused_control_is_inconclusive():
    # Over plain HTTP nothing vouches for the probe's page, and the control's
    # refusal leaves nothing to compare it with.
    host = "refuses-dc.example"
    r = web(f"http://{host}/", queries=[q(host, IP)], tcps=[tcp(IP, 80)], requests=[http(f"http://{host}/", IP, body=NEWS)],
            ctl=control(addrs=(IP,), port=80, status=403, body=page("Forbidden", 400), title="Forbidden"))
    v = one(r)
    assert (v["status"], v["evidence"]["rule"]) == ("inconclusive", "control_refused_plain_http"), v


def test_captcha_over_plain_http_is_server_side():
    r = web("http://cf.example/", queries=[q("cf.example", IP)], tcps=[tcp(IP, 80)],
            requests=[http("http://cf.example/", IP, status=503, body=page("Just a moment...", 8000))],
            ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    assert one(r)["status"] == "server_side"


def test_down_for_everyone_is_down():
    r = web("https://off.example/", queries=[q("off.example", IP)], tcps=[tcp(IP, 443, "generic_timeout_error")],
            ctl=control(addrs=(IP,), tcp_ok={IP: "generic_timeout_error"}, tls_ok={}, http_failure="generic_timeout_error"))
    v = one(r)
    assert v["status"] == "down" and v["method"] is None


def test_offline_probe_is_inconclusive_never_blocked():
    r = web("https://any.example/", queries=[q("any.example", failure="network_unreachable")],
            tcps=[], ctl=None, control_failure="network_unreachable", network_ok=False)
    v = one(r)
    assert v["status"] == "inconclusive"
    assert v["evidence"]["compared"]["evidence"] == "probe offline"


def test_offline_flag_with_dns_only_failures_alone_in_run_stays_inconclusive():
    r = web("https://drop.example/", queries=[q("drop.example", failure="dns_temporary_failure")],
            ctl=control(addrs=(IP,), body=NEWS, title="Daily News"), network_ok=False, run_id="lonely")
    assert one(r)["status"] == "inconclusive"


def test_dynamic_page_is_ok():
    # Another body (less than half the control's length, another hash) under
    # the same status and title: a dynamic page, not a blockpage.
    r = ok_https("changing.example", body=page("Daily News", 9000))
    assert r["test_keys"]["requests"][0]["x_body_sha256"] != control(body=NEWS)["http_request"]["x_body_sha256"]
    v = one(r)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "page_matches_control")
    assert v["evidence"]["compared"]["length_ratio"] < 0.5


def _slow(entry: dict, t0: float, t: float) -> dict:
    entry["t0"], entry["t"] = t0, t
    return entry


def test_slow_site_is_ok_and_redirect_to_matching_page_is_ok():
    # Every step slow (a 2 s connect, a 2.5 s handshake, a page that took
    # 10 s to arrive in full) but nothing failed: slowness alone is no verdict.
    host = "sluggish.example"
    slow = web(f"https://{host}/", queries=[_slow(q(host, IP), 0.0, 1.5)], tcps=[_slow(tcp(IP), 1.5, 3.5)],
               tlss=[_slow(tls(IP, host), 3.5, 6.0)], requests=[_slow(http(f"https://{host}/", IP, body=NEWS), 3.5, 16.0)],
               ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    moved = web("http://moved.example/", queries=[q("moved.example", IP), q("moved-target.example", IP)],
                tcps=[tcp(IP, 80), tcp(IP)], tlss=[tls(IP, "moved-target.example")],
                requests=[http("http://moved.example/", IP, status=301, body="", index=0),
                          http("https://moved-target.example/", IP, body=NEWS, index=1)],
                ctl=control(addrs=(IP,), port=80, body=NEWS, title="Daily News"))
    con = database([slow, moved])
    assert verdict(con, slow)["status"] == "ok"
    assert verdict(con, moved)["status"] == "ok"


def test_missing_control_is_inconclusive_but_valid_https_page_is_ok():
    plain = web("http://nc.example/", queries=[q("nc.example", IP)], tcps=[tcp(IP, 80)],
                requests=[http("http://nc.example/", IP, body=NEWS)], ctl=None)
    secure = web("https://nc.example/", queries=[q("nc.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "nc.example")],
                 requests=[http("https://nc.example/", IP, body=NEWS)], ctl=None)
    con = database([plain, secure])
    assert verdict(con, plain)["status"] == "inconclusive"
    assert verdict(con, secure)["status"] == "ok"


def test_throttling_hook():
    # Throughput comes from the throttling test's records (probe downloads and
    # the helper's own), judged by analysis/throttling.py inside analyze();
    # the web test writes no throughput. A web fetch that timed out mid-body
    # on a site that timed out for the control too is slow for everyone.
    throttled = throttling("https://social.example/", 120, 9000, 9500)
    tired = web("https://tired.example/", queries=[q("tired.example", IP)], tcps=[tcp(IP)], tlss=[tls(IP, "tired.example")],
                requests=[http("https://tired.example/", IP, body="x" * 1000, failure="generic_timeout_error")],
                ctl=control(addrs=(IP,), http_failure="generic_timeout_error"))
    con = database([throttled, tired])
    v = verdict(con, throttled)
    assert (v["status"], v["method"]) == ("throttled", "throttle.sni")
    assert v["evidence"]["ks"]["n"] == 40
    v = verdict(con, tired)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "slow_for_everyone")


def test_only_missing_bounds_the_throttling_step_too():
    from analysis.engine import analyze
    from probes.store import write_all

    first = throttling("https://social.example/", 120, 9000, 9500)
    con = database([first])
    before = row(con, "SELECT status, analysed_at FROM verdicts WHERE measurement_id = ?", [first["measurement_id"]])
    assert before["status"] == "throttled"
    second = throttling("https://video.example/", 9000, 9000, 9500)
    write_all(con, [(second, None)])
    assert analyze(con, only_missing=True, fingerprints_dir="/nonexistent", public_networks=["198.18.0.0/15"]) == 1
    after = row(con, "SELECT status, analysed_at FROM verdicts WHERE measurement_id = ?", [first["measurement_id"]])
    assert after == before  # judged once, not again
    assert verdict(con, second)["status"] == "ok"


def test_a_failed_run_leaves_the_previous_verdicts(monkeypatch):
    import analysis.throttling
    from analysis.engine import analyze
    from probes.store import write_all

    a = ok_https()
    con = database([a])
    before = con.execute("SELECT * FROM verdicts").fetchall()
    write_all(con, [(ok_https("other.example"), None)])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    # The throttling step runs after the web verdicts are written: its failure
    # must take them back too.
    monkeypatch.setattr(analysis.throttling, "apply_throttling", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        analyze(con, fingerprints_dir="/nonexistent")
    assert con.execute("SELECT * FROM verdicts").fetchall() == before
    assert not con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()
    monkeypatch.undo()
    assert analyze(con, fingerprints_dir="/nonexistent") == 2


def test_one_success_among_retries_clears_the_path():
    # The probe retries a step that failed the censor's way (x_attempt); one
    # success on the same path means it is not blocked (Hyperquack's rule).
    host = "flaky.example"
    url = f"https://{host}/"
    ctl = control(addrs=(IP,), body=NEWS, title="Daily News")
    # the fetch: attempt 1 worked (listed first, older transaction id), attempt 0 was reset
    fetched = web(url, queries=[q(host, IP)],
                  tcps=[tcp(IP, failure="generic_timeout_error", attempt=0), tcp(IP, attempt=1)],
                  tlss=[tls(IP, host, failure="connection_reset", attempt=0), tls(IP, host, attempt=1)],
                  requests=[http(url, IP, body=NEWS, attempt=1), http(url, IP, status=None, failure="connection_reset", attempt=0)],
                  ctl=ctl)
    # the handshake worked on its second try, every fetch timed out: an HTTP
    # matter, not a TLS reset
    handshake = web(url, queries=[q(host, IP)], tcps=[tcp(IP, attempt=0)],
                    tlss=[tls(IP, host, failure="connection_reset", attempt=0), tls(IP, host, attempt=1)],
                    requests=[http(url, IP, status=None, failure="generic_timeout_error", attempt=a) for a in range(3)],
                    ctl=ctl)
    # every attempt refused: blocking
    refused = web(url, queries=[q(host, IP)], tcps=[tcp(IP, failure="connection_refused", attempt=a) for a in range(3)],
                  ctl=ctl)
    con = database([fetched, handshake, refused])
    v = verdict(con, fetched)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "page_matches_control"), v
    v = verdict(con, handshake)
    assert (v["status"], v["method"]) == ("blocked", "http.timeout"), v
    v = verdict(con, refused)
    assert (v["status"], v["method"]) == ("blocked", "tcp.reset"), v


def _asn_db(path, networks: dict[str, tuple[int, str]]):
    """A MaxMind-format ASN database (GeoLite2-ASN keys), as `vantage geo update` installs it."""
    writer_mod = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = writer_mod.MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN")
    for network, (number, org) in networks.items():
        writer.insert_network(IPSet([network]), {"autonomous_system_number": writer_mod.MmdbU32(number),
                                                 "autonomous_system_organization": org})
    path.mkdir(exist_ok=True)
    writer.to_db_file(str(path / "asn.mmdb"))
    return path


def test_an_answer_in_the_controls_autonomous_system_is_consistent(tmp_path):
    # A CDN: the probe's resolver gives a node in one prefix, the control's in
    # another, one AS announces both. The probe's connect to its node timed
    # out where the control's connect to it worked: TCP, not DNS.
    host, mine, theirs = "cdn.example", "198.18.60.1", "198.18.70.1"
    url = f"http://{host}/"

    def record():
        return web(url, queries=[q(host, mine)], tcps=[tcp(mine, 80, "generic_timeout_error", attempt=a) for a in range(2)],
                   ctl=control(addrs=(theirs,), port=80, body=NEWS, title="Daily News", tcp_ok={theirs: None, mine: None}))

    one_as = _asn_db(tmp_path / "one", {"198.18.60.0/24": (64600, "Lab CDN"), "198.18.70.0/24": (64600, "Lab CDN")})
    two_as = _asn_db(tmp_path / "two", {"198.18.60.0/24": (64666, "Elsewhere"), "198.18.70.0/24": (64600, "Lab CDN")})
    same_org = _asn_db(tmp_path / "org", {"198.18.60.0/24": (64601, "Lab CDN"), "198.18.70.0/24": (64600, "Lab CDN")})
    assert one(record())["method"] == "dns.inconsistent"  # nothing says the answers belong together
    assert one(record(), asn_db=one_as)["method"] == "tcp.timeout"
    assert one(record(), asn_db=same_org / "asn.mmdb")["method"] == "tcp.timeout"
    assert one(record(), asn_db=two_as)["method"] == "dns.inconsistent"
    # the helper's ip_info ASNs count without a database
    r = record()
    r["test_keys"]["control"]["ip_info"] = {mine: {"asn": 64600, "flags": 1}, theirs: {"asn": 64600, "flags": 2}}
    assert one(r)["method"] == "tcp.timeout"


def test_a_page_from_the_controls_autonomous_system_is_not_a_foreign_address(tmp_path):
    host, mine, theirs = "geo-cdn.example", "198.18.60.1", "198.18.70.1"
    url = f"http://{host}/"
    r = web(url, queries=[q(host, mine)], tcps=[tcp(mine, 80)], requests=[http(url, mine, body=page("Local Edition", 3000))],
            ctl=control(addrs=(theirs,), port=80, body=NEWS, title="Daily News"))
    db = _asn_db(tmp_path, {"198.18.60.0/24": (64600, "Lab CDN"), "198.18.70.0/24": (64600, "Lab CDN")})
    assert one(r)["evidence"]["rule"] == "dns_page_from_foreign_address"
    assert one(r, asn_db=db)["evidence"]["rule"] == "http_page_differs"


def test_an_unreadable_asn_database_is_a_clear_error(tmp_path):
    from analysis.engine import AnalysisError

    with pytest.raises(AnalysisError, match="no ASN database"):
        one(ok_https(), asn_db=tmp_path)
    (tmp_path / "asn.mmdb").write_text("not a database")
    with pytest.raises(AnalysisError, match="cannot read the ASN database"):
        one(ok_https(), asn_db=tmp_path)


def test_only_missing_and_replacement():
    from analysis.engine import analyze

    a, b = ok_https(), ok_https("other.example")
    con = database([a])
    from probes.store import write_all

    write_all(con, [(b, None)])
    assert analyze(con, only_missing=True, fingerprints_dir="/nonexistent") == 1
    assert analyze(con, fingerprints_dir="/nonexistent") == 2
    assert con.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 2


def test_aggregate_views():
    con = database([ok_https(), web("https://nx.example/", queries=[q("nx.example", failure="dns_nxdomain_error")],
                                    ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))])
    counts = row(con, "SELECT measurements, ok, anomaly, blocked, confirmed, inconclusive, anomaly_rate FROM agg_country_day")
    assert counts == {"measurements": 2, "ok": 1, "anomaly": 1, "blocked": 1, "confirmed": 0, "inconclusive": 0,
                      "anomaly_rate": 0.5}
    for view in ("agg_asn", "agg_domain", "agg_category"):
        assert con.execute(f"SELECT sum(measurements) FROM {view}").fetchone()[0] == 2


@pytest.mark.parametrize("failure", ["network_unreachable", "host_unreachable"])
def test_ipv4_only_probe_with_aaaa_answers_on_both_paths_is_ok(failure):
    # OONI's youtube/noipv6 case: the system resolver and the probe's own UDP
    # query both give an AAAA answer the control (elsewhere) did not; the
    # probe has no IPv6, so its v6 connects fail unroutable, and it got the
    # page over validated HTTPS from the v4 address. Not a forger on the path.
    v6 = "2a00:1450:4001::20"
    host = "dual.example"
    r = web(f"https://{host}/", queries=[q(host, IP, v6), q(host, IP, v6, engine="udp", resolver="198.18.0.53:53")],
            tcps=[tcp(IP), tcp(v6, failure=failure)], tlss=[tls(IP, host)],
            requests=[http(f"https://{host}/", IP, body=NEWS)], ctl=control(addrs=(IP,), body=NEWS, title="Daily News"))
    v = one(r)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "page_matches_control")


def test_ipv4_only_probe_on_a_geo_dns_site_is_ok():
    # The probe's resolver gave its own (valid) v4 address plus a v6 one the
    # probe cannot route to; plain http, so no certificate vouches for either.
    v4, v6 = "198.18.0.20", "2a00:1450:4001::20"
    url = "http://geo.example/"
    r = web(url, queries=[q("geo.example", v4, v6)], tcps=[tcp(v4, 80), tcp(v6, 80, failure="network_unreachable")],
            requests=[http(url, v4, body=NEWS)],
            ctl=control(addrs=("198.18.0.30",), body=NEWS, title="Daily News", port=80))
    assert one(r)["status"] == "ok"


def test_an_odd_header_name_does_not_stop_the_analysis():
    r = ok_https()
    r["test_keys"]["requests"][0]["response"]["headers"] = {'X-"quoted"': "1", "": "empty", "Back\\slash": "x",
                                                           "Content-Type": "text/html"}
    r["test_keys"]["requests"][0]["response"]["code"] = 403  # differs from the control: fingerprints are scanned
    assert one(r)["status"] in ("server_side", "blocked")


def test_one_blocked_address_family_is_found_only_where_that_family_works():
    # A censor blackholes a dual-stack site's IPv6 address only: the probe's
    # IPv6 connects to it time out on every attempt while the control connects
    # to that very endpoint, and the page arrives over IPv4. Blocked (tcp),
    # when the probe's IPv6 demonstrably works: another IPv6 connect of the
    # same run succeeded (here, to another dual-stack site).
    v4, v6 = IP, "2001:2:0:100::2"
    host = "v6-blackholed.example"
    url = f"https://{host}/"

    def blackholed(run_id="run-v6", failure="generic_timeout_error"):
        return web(url, run_id=run_id, queries=[q(host, v4, v6)],
                   tcps=[tcp(v4, attempt=0)] + [tcp(v6, failure=failure, attempt=a) for a in range(3)],
                   tlss=[tls(v4, host)], requests=[http(url, v4, body=NEWS)],
                   ctl=control(addrs=(v4, v6), body=NEWS, title="Daily News"))

    def other_dual(run_id="run-v6", v6_failure=None):
        other6 = "2001:2:0:100::1"
        return web("https://dual.example/", run_id=run_id, queries=[q("dual.example", "198.18.0.11", other6)],
                   tcps=[tcp("198.18.0.11", attempt=0), tcp(other6, failure=v6_failure, attempt=0)],
                   tlss=[tls("198.18.0.11", "dual.example")], requests=[http("https://dual.example/", "198.18.0.11", body=NEWS)],
                   ctl=control(addrs=("198.18.0.11", other6), body=NEWS, title="Daily News"))

    nets = ["198.18.0.0/15", "2001:2::/48"]
    r = blackholed()
    con = database([r, other_dual()], public_networks=nets)
    v = verdict(con, r)
    assert (v["status"], v["layer"], v["method"]) == ("blocked", "tcp", "tcp.timeout"), v
    assert v["evidence"]["rule"] == "tcp_family_timeout"
    assert v["evidence"]["compared"]["family"] == "IPv6"
    assert v["evidence"]["compared"]["endpoint"] == f"[{v6}]:443"
    whole = web(url, queries=[q(host, v4)], tcps=[tcp(v4, failure="generic_timeout_error", attempt=a) for a in range(3)],
                ctl=control(addrs=(v4,), body=NEWS, title="Daily News"))
    w = verdict(database([whole]), whole)
    assert w["evidence"]["rule"] == "tcp_timeout" and v["confidence"] < w["confidence"]  # less sure than a whole-site block
    # refused on every attempt: tcp.reset
    r = blackholed(failure="connection_refused")
    v = verdict(database([r, other_dual()], public_networks=nets), r)
    assert (v["status"], v["method"], v["evidence"]["rule"]) == ("blocked", "tcp.reset", "tcp_family_refused"), v

    # The traps: the same shape without evidence that the probe's IPv6 works.
    # Alone in its run:
    r = blackholed()
    v = verdict(database([r], public_networks=nets), r)
    assert (v["status"], v["evidence"]["rule"]) == ("ok", "page_matches_control"), v
    # the IPv6 success was in another run:
    r = blackholed()
    v = verdict(database([r, other_dual(run_id="run-elsewhere")], public_networks=nets), r)
    assert v["status"] == "ok", v
    # the run's other IPv6 connects failed too (IPv6 silently broken for the probe):
    r = blackholed()
    v = verdict(database([r, other_dual(v6_failure="generic_timeout_error")], public_networks=nets), r)
    assert v["status"] == "ok", v
    # unroutable IPv6 (no IPv6, or broken at the ISP) is never evidence, even beside a working one:
    r = blackholed(failure="network_unreachable")
    v = verdict(database([r, other_dual()], public_networks=nets), r)
    assert v["status"] == "ok", v
    # the control could not connect to that endpoint either: not the censor's doing
    r = blackholed()
    r["test_keys"]["control"]["tcp_connect"][f"[{v6}]:443"] = {"status": False, "failure": "generic_timeout_error"}
    v = verdict(database([r, other_dual()], public_networks=nets), r)
    assert v["status"] == "ok", v
