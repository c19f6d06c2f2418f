"""The helper's target policy: pure address logic, no network."""

from __future__ import annotations

import ipaddress

import pytest

from core.net import Policy, canonical, parse_ip, parse_ipv4_lenient, refusal_reason


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
    ],
)
def test_odd_ipv4_notations(text, expected):
    assert str(parse_ipv4_lenient(text)) == expected


@pytest.mark.parametrize("text", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "0x", "1..1", "", "4294967296"])
def test_hostnames_and_invalid_numbers_are_not_addresses(text):
    if text == "0x":
        assert str(parse_ipv4_lenient(text)) == "0.0.0.0"  # inet_aton accepts a bare 0x
    else:
        assert parse_ipv4_lenient(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::",
        "100.64.0.1", "198.18.0.1", "198.19.255.255", "192.0.2.1", "198.51.100.7", "203.0.113.9",
        "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "fe80::1", "fc00::1", "fd12::1",
        "ff02::1", "2001:db8::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
        "::127.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1", "[::1]", "fe80::1%eth0",
        "2130706433", "0177.0.0.1", "0x7f.1", "127.1", "0xa9.0xfe.0xa9.0xfe",
    ],
)
def test_non_public_addresses_are_refused(text):
    decision = Policy().check(text)
    assert not decision.allowed, text
    assert decision.reason


@pytest.mark.parametrize("text", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8", "1.1.1.1"])
def test_public_addresses_are_allowed(text):
    decision = Policy().check(text)
    assert decision.allowed, (text, decision)


def test_mapped_forms_connect_to_the_ipv4_address():
    assert str(canonical(ipaddress.ip_address("::ffff:8.8.8.8"))) == "8.8.8.8"
    assert Policy().check("::ffff:8.8.8.8").address == "8.8.8.8"


def test_allow_list_overrides_exactly():
    policy = Policy.from_cidrs(["127.0.0.2/32", "198.18.0.0/15"])
    assert policy.check("127.0.0.2").allowed
    assert policy.check("::ffff:127.0.0.2").allowed
    assert not policy.check("127.0.0.1").allowed
    assert not policy.check("2130706433").allowed
    assert policy.check("198.18.100.7").allowed
    assert not policy.check("10.0.0.1").allowed
    # Allow-listed addresses are the operator's "public" ones: not bogons.
    assert not policy.is_bogon("198.18.100.7")
    assert policy.is_bogon("10.0.0.1")


def test_hostname_is_never_allowed_unresolved():
    assert not Policy().check("localhost").allowed


def test_reasons_name_the_range():
    assert refusal_reason(ipaddress.ip_address("100.64.1.1")) == "cgnat"
    assert refusal_reason(ipaddress.ip_address("64:ff9b::7f00:1")) == "embedded-loopback"
    assert parse_ip("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")


def test_invalid_allow_cidr():
    with pytest.raises(ValueError):
        Policy.from_cidrs(["not-a-cidr"])


@pytest.mark.parametrize("url, expected", [
    ("http://１２７.０.０.１/secret", "127.0.0.1"),  # full-width digits: NFKC makes them ASCII
    ("https://127。0。0。1/", "127.0.0.1"),  # ideographic full stops are label separators
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://[::ffff:127.0.0.1]:8080/", "127.0.0.1"),
])
def test_url_host_is_the_host_the_client_connects_to(url, expected):
    from core.net import url_host

    host, ip = url_host(url)
    assert ip is not None and str(canonical(ip)) == expected
    assert refusal_reason(ip) == "loopback"


def test_url_host_of_names_is_idna():
    from core.net import url_host

    assert url_host("http://Bücher.DE./") == ("xn--bcher-kva.de", None)
    with pytest.raises(ValueError):
        url_host("http:///nohost")
