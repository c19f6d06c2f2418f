"""probes.dns builds plain queries and reads plain replies by hand (the CPU
of a run); every record must be what dnspython's reading gives, and every
reply the fast path does not take is dnspython's to read."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rcode
import dns.rrset

from probes import dns as vdns


def _entry(reply, qtype: str):
    if reply is None:
        return None
    return vdns._entry_from_response(reply, engine="udp", resolver="127.0.0.1:53", hostname="h", qtype=qtype,
                                     t0=0.0, t=1.0, txid=1)


def _both(data: bytes, fast: vdns._Query, qtype: str):
    """(by hand or dnspython, dnspython alone) for ``data`` answering ``fast``."""
    slow = vdns._Query(fast.wire, message=dns.message.from_wire(fast.wire))  # no qname: dnspython reads
    got, got_tc = vdns._parse_reply(data, fast)
    want, want_tc = vdns._parse_reply(data, slow)
    return (_entry(got, qtype), got_tc), (_entry(want, qtype), want_tc)


def test_plain_queries_are_what_dnspython_sends():
    for name in ["site1.bench.test", "SiTe2.Bench.Test.", "a", "x-y_z.example.org", "a" * 63 + ".test"]:
        for qtype in ("A", "AAAA"):
            query = vdns.make_query(name, qtype)
            assert query.qname is not None
            reference = dns.message.make_query(name, qtype)
            reference.id = query.id
            assert query.wire == reference.to_wire()
            assert query.message == reference


def test_other_queries_are_dnspython_s():
    for name, qtype in [("été.example", "A"), ("a\\.b.test", "A"), ("x.test", "TXT"), ("a" * 64 + ".test", "A")]:
        try:
            reference = dns.message.make_query(name, qtype)
        except Exception as exc:  # what dnspython refuses, make_query refuses the same way
            try:
                vdns.make_query(name, qtype)
            except type(exc):
                continue
            raise AssertionError(f"{name!r} should be refused")
        query = vdns.make_query(name, qtype)
        assert query.qname is None
        reference.id = query.id
        assert query.wire == reference.to_wire()


def _replies(query: dns.message.Message, rng: random.Random) -> list[bytes]:
    name = query.question[0].name
    qtype = query.question[0].rdtype
    out = []

    def reply(build, rcode=dns.rcode.NOERROR, edns=False, tc=False):
        r = dns.message.make_response(query)
        r.set_rcode(rcode)
        if edns:
            r.use_edns(0)
        if tc:
            r.flags |= dns.flags.TC
        build(r)
        out.append(r.to_wire())

    def rr(r, owner, rtype, ttl, *values, section="answer"):
        getattr(r, section).append(dns.rrset.from_text(owner, ttl, "IN", rtype, *values))

    reply(lambda r: None)
    for rcode in (dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR, dns.rcode.NOTIMP):
        reply(lambda r: None, rcode)
    reply(lambda r: rr(r, name, "A", 60, "127.0.0.1"))
    reply(lambda r: rr(r, name, "A", 60, "127.0.0.1", "10.0.0.2", "198.18.0.9"))
    reply(lambda r: rr(r, name, "AAAA", 30, "2001:2::1", "::ffff:1.2.3.4", "2001:db8::"))
    reply(lambda r: (rr(r, name, "CNAME", 300, "Alias.Example.ORG."), rr(r, "alias.example.org.", "A", 5, "1.1.1.1")))
    reply(lambda r: (rr(r, name, "CNAME", 300, "a.test."), rr(r, "a.test.", "CNAME", 9, "b.test."),
                     rr(r, "b.test.", "AAAA", 1, "2001:2::5")))
    reply(lambda r: rr(r, name, "A", 2 ** 31 + 5, "127.0.0.1"))
    reply(lambda r: rr(r, name, "TXT", 60, '"hello"'))
    reply(lambda r: rr(r, name, "CNAME", 60, "we\\.ird.test."))
    reply(lambda r: rr(r, name, "A", 60, "127.0.0.1"), edns=True)
    reply(lambda r: rr(r, name, "A", 60, "127.0.0.1"), tc=True)
    reply(lambda r: (rr(r, name, "A", 60, "127.0.0.1"), rr(r, name, "NS", 60, "ns.test.", section="authority")))
    reply(lambda r: (rr(r, name, "A", 60, "127.0.0.1"), rr(r, "ns.test.", "A", 60, "9.9.9.9", section="additional")))
    # Records of one set apart on the wire, duplicates, other TTLs, an owner in other case:
    # dnspython merges them into one set (lowest TTL, first order, no duplicate).
    header = dns.message.make_response(query).to_wire()[:12]
    qsection = query.to_wire()[12:]

    def record(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
        return owner + rtype.to_bytes(2, "big") + b"\x00\x01" + ttl.to_bytes(4, "big") + len(rdata).to_bytes(2, "big") + rdata

    pointer = b"\xc0\x0c"
    upper = qsection[:-4].upper()
    records = [record(pointer, 1, 60, bytes([1, 2, 3, 4])), record(b"\x05other\x00", 1, 7, bytes([5, 6, 7, 8])),
               record(upper, 1, 20, bytes([1, 2, 3, 4])), record(pointer, 1, 3, bytes([9, 9, 9, 9])),
               record(pointer, 28, 60, bytes(range(16))), record(pointer, 5, 60, b"\x03abc\xc0\x0c"),
               record(pointer, 5, 61, b"\x03def\xc0\x0c")]
    for _ in range(40):
        picked = rng.sample(records, rng.randint(1, len(records)))
        wire = header[:6] + len(picked).to_bytes(2, "big") + b"\x00\x00\x00\x00" + qsection + b"".join(picked)
        out.append(bytes([wire[0], wire[1]]) + wire[2:])
    return out


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    out = [data[:-1], data + b"\x00", data[:12], data[:rng.randrange(1, len(data))]]
    for _ in range(12):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        out.append(bytes(mutated))
    return out


def test_replies_read_by_hand_are_what_dnspython_reads():
    rng = random.Random(2024)
    compared = fast_taken = 0
    for name in ["site1.bench.test", "MiXeD.Case.test"]:
        for qtype in ("A", "AAAA"):
            query = vdns.make_query(name, qtype)
            for data in _replies(query.message, rng):
                for candidate in [data, *_mutations(data, rng)]:
                    got, want = _both(candidate, query, qtype)
                    assert got == want, candidate.hex()
                    compared += 1
                    fast_taken += vdns._fast_reply(candidate, query) is not None
    assert compared > 1000
    assert fast_taken > 100  # the fast path is taken, not always deferred


def test_a_stranger_is_not_a_reply():
    query = vdns.make_query("site.test", "A")
    other = vdns.make_query("other.test", "A")
    response = dns.message.make_response(other.message)
    assert vdns._parse_reply(response.to_wire(), query) == (None, False)
    wrong_id = dns.message.make_response(query.message)
    wrong_id.id = (query.id + 1) % 65536
    assert vdns._parse_reply(wrong_id.to_wire(), query) == (None, False)


def _answer_with_name(query: vdns._Query, name: bytes) -> bytes:
    """A reply to ``query`` whose one A answer has the owner name ``name``
    (raw wire bytes: pointers and all)."""
    import struct

    header = struct.pack("!HHHHHH", query.id, 0x8180, 1, 1, 0, 0)
    question = query.wire[12:]
    return header + question + name + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 9])


def test_hostile_names_and_headers_are_never_read_by_hand():
    """Pointer tricks, oversized names, an echoed query and another opcode:
    the hand reader declines each (dnspython then reads or refuses it, as
    before), so it never loops, reads out of bounds or takes a stranger."""
    query = vdns.make_query("site.test", "A")
    end = len(query.wire)  # the answer starts here
    cases = {
        "pointer to itself": bytes([0xC0 | (end >> 8), end & 0xFF]),
        "pointer forward, past the end": b"\xc0\xff",
        "pointer loop through a label": b"\x01a" + bytes([0xC0 | (end >> 8), end & 0xFF]),
        "name over 255 bytes": b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00",
        "label cut by the datagram's end": b"\x3fabc",
    }
    for what, name in cases.items():
        data = _answer_with_name(query, name)
        assert vdns._fast_reply(data, query) is None, what
        got, want = _both(data, query, "A")
        assert got == want, what
    echoed = query.wire  # QR clear: our own query reflected back
    assert vdns._parse_reply(echoed, query) == (None, False)
    other_opcode = bytearray(_answer_with_name(query, b"\xc0\x0c"))
    other_opcode[2] |= 0x28  # opcode 5 (UPDATE)
    assert vdns._fast_reply(bytes(other_opcode), query) is None
    plain = _answer_with_name(query, b"\xc0\x0c")  # the same reply, a pointer to the question: read by hand
    assert vdns._fast_reply(plain, query) is not None
