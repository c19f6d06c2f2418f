"""Measurement records: OONI-shaped JSON, versioned, with Vantage ``x_`` extensions.

A record is a plain ``dict`` so that one flattener (probes/flatten.py) serves our
own measurements, control responses and imported OONI measurements alike. The
observation builders below fix each entry's shape (OONI's data formats, with
our additions prefixed ``x_``); docs/schema.md documents how each entry is
stored.

Every entry carries ``t0``/``t`` (seconds relative to the measurement start) and
a ``transaction_id`` tying the DNS, TCP, TLS and HTTP steps of one attempt.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
SOFTWARE_NAME = "vantage"
SOFTWARE_VERSION = "0.1.0"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond timestamp + 80 random bits, Crockford base32.
    Lexicographic order is time order, so ids sort like measurements happened."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def utc_timestamp(when: float | None = None) -> str:
    """OONI's ``measurement_start_time`` format."""
    moment = dt.datetime.fromtimestamp(time.time() if when is None else when, dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


class Clock:
    """Seconds since the measurement started; injectable for deterministic tests."""

    def __init__(self, start: float | None = None, source=time.monotonic):
        self._source = source
        self._start = source() if start is None else start

    def now(self) -> float:
        return round(self._source() - self._start, 6)


@dataclass
class Transactions:
    """Hands out transaction ids, one per attempted step chain."""

    _next: int = 1

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value


# --- Observation builders: the only places entry shapes are defined. -----------


def dns_query(
    *,
    engine: str,
    resolver: str,
    hostname: str,
    query_type: str,
    answers: list[dict[str, Any]],
    failure: str | None,
    rcode: str | None,
    t0: float,
    t: float,
    transaction_id: int,
    response_index: int = 0,
) -> dict[str, Any]:
    """One DNS response (or failure). ``engine``: ``system`` (getaddrinfo),
    ``udp``, ``doh``. A late duplicate response to the same query is another
    entry with the same ``transaction_id`` and ``x_response_index`` >= 1."""
    return {
        "engine": engine,
        "resolver_address": resolver,
        "hostname": hostname,
        "query_type": query_type,
        "answers": answers,
        "failure": failure,
        "rcode": rcode,
        "t0": t0,
        "t": t,
        "transaction_id": transaction_id,
        "x_response_index": response_index,
    }


def dns_answer(answer_type: str, value: str, ttl: int | None = None) -> dict[str, Any]:
    key = {"A": "ipv4", "AAAA": "ipv6", "CNAME": "hostname"}.get(answer_type, "value")
    return {"answer_type": answer_type, key: value, "ttl": ttl}


def tcp_connect(*, ip: str, port: int, failure: str | None, t0: float, t: float, transaction_id: int) -> dict[str, Any]:
    return {
        "ip": ip,
        "port": port,
        "status": {"success": failure is None, "failure": failure, "blocked": None},
        "t0": t0,
        "t": t,
        "transaction_id": transaction_id,
    }


@dataclass
class CertInfo:
    """The certificate a server presented, and whether it validates for the name."""

    der: bytes | None = None
    valid: bool | None = None  # None: not checked (no certificate seen)
    error: str | None = None  # failure string of the validation, when invalid
    subject: str | None = None
    issuer: str | None = None
    not_after: str | None = None
    sha256: str | None = None

    @classmethod
    def from_der(cls, der: bytes, valid: bool | None, error: str | None) -> "CertInfo":
        info = cls(der=der, valid=valid, error=error, sha256=hashlib.sha256(der).hexdigest())
        try:
            from cryptography import x509

            cert = x509.load_der_x509_certificate(der)
            info.subject = cert.subject.rfc4514_string()
            info.issuer = cert.issuer.rfc4514_string()
            info.not_after = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S")
        except Exception:  # a malformed certificate is itself an observation
            pass
        return info


def tls_handshake(
    *,
    address: str,
    server_name: str,
    failure: str | None,
    t0: float,
    t: float,
    transaction_id: int,
    tls_version: str | None = None,
    cipher_suite: str | None = None,
    negotiated_protocol: str | None = None,
    cert: CertInfo | None = None,
    chain: list[bytes] | None = None,
) -> dict[str, Any]:
    """``chain``: every certificate the server presented, leaf first (OONI's
    peer_certificates); ``cert`` describes the leaf and its validation."""
    cert = cert or CertInfo()
    presented = chain if chain else ([cert.der] if cert.der else [])
    return {
        "address": address,
        "server_name": server_name,
        "failure": failure,
        "tls_version": tls_version,
        "cipher_suite": cipher_suite,
        "negotiated_protocol": negotiated_protocol,
        "no_tls_verify": False,
        "peer_certificates": [{"format": "base64", "data": base64.b64encode(der).decode()} for der in presented],
        "t0": t0,
        "t": t,
        "transaction_id": transaction_id,
        "x_cert_valid": cert.valid,
        "x_cert_error": cert.error,
        "x_cert_subject": cert.subject,
        "x_cert_issuer": cert.issuer,
        "x_cert_not_after": cert.not_after,
        "x_cert_sha256": cert.sha256,
    }


def body_field(body: bytes) -> str | dict[str, str]:
    """OONI stores text bodies as strings and binary ones as base64 objects."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"format": "base64", "data": base64.b64encode(body).decode()}


def title_bytes(body: bytes) -> bytes | None:
    """The raw content of the first <title> element, found in linear time (a
    lazy regex is quadratic on a hostile page full of unclosed <title> tags:
    minutes of CPU for 512 KiB)."""
    low = body.lower()
    start = low.find(b"<title")
    if start < 0:
        return None
    opened = low.find(b">", start)
    if opened < 0:
        return None
    end = low.find(b"</title", opened)
    return body[opened + 1:end] if end >= 0 else None


def body_bytes(body: str | dict | None) -> bytes:
    """The bytes of a body field (text, or OONI's base64 object). Never raises:
    a malformed body degrades to what can be read of it, not a lost record."""
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    if isinstance(body, dict) and isinstance(body.get("data"), str):
        return b64decode_lenient(body["data"])
    return b""


_B64_JUNK = re.compile(r"[^A-Za-z0-9+/]")


def b64decode_lenient(data: str) -> bytes:
    """Base64 as real-world data writes it: missing or extra padding,
    URL-safe letters, whitespace and stray characters (OONI's
    ``web_connectivity_b64_incorrect`` measurement has a body ``aGk``)."""
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error is a ValueError
        pass
    text = _B64_JUNK.sub("", data.replace("-", "+").replace("_", "/"))
    if len(text) % 4 == 1:  # a lone trailing character holds no whole byte
        text = text[:-1]
    return base64.b64decode(text + "=" * (-len(text) % 4))


def network_event(*, operation: str, t: float, transaction_id: int, num_bytes: int | None = None, address: str | None = None) -> dict[str, Any]:
    return {"operation": operation, "num_bytes": num_bytes, "t": t, "transaction_id": transaction_id, "address": address}


MAX_NETWORK_EVENTS = 64  # per transaction, as OONI keeps


class EventSampler:
    """The ``bytes_received`` events of one transaction, at most ``limit`` of them.

    Past the limit, neighbouring events are merged pairwise (bytes summed, the
    later time kept) and later chunks fill each event up to the new stride, so
    the byte total and the last arrival stay exact while the time resolution
    halves: a server sending a million tiny chunks costs 64 events.
    """

    def __init__(self, limit: int = MAX_NETWORK_EVENTS) -> None:
        self.limit = max(2, limit - limit % 2)
        self.events: list[dict[str, Any]] = []
        self._stride = 1  # chunks per event
        self._fill = 0  # chunks in the last event

    def add(self, event: dict[str, Any]) -> None:
        if self.events and self._fill < self._stride:
            last = self.events[-1]
            last["num_bytes"] = (last["num_bytes"] or 0) + (event["num_bytes"] or 0)
            last["t"] = event["t"]
            self._fill += 1
            return
        if len(self.events) >= self.limit:
            merged = []
            for first, second in zip(self.events[::2], self.events[1::2]):
                first["num_bytes"] = (first["num_bytes"] or 0) + (second["num_bytes"] or 0)
                first["t"] = second["t"]
                merged.append(first)
            self.events = merged
            self._stride *= 2
        self.events.append(event)
        self._fill = 1


@dataclass
class Measurement:
    """The envelope around a test's ``test_keys``."""

    test_name: str
    test_version: str
    input: str
    run_id: str
    probe_cc: str = "ZZ"
    probe_asn: str = "AS0"
    probe_network_name: str | None = None
    resolver_asn: str = "AS0"
    measurement_id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.time)
    runtime: float = 0.0
    annotations: dict[str, Any] = field(default_factory=dict)
    test_keys: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "data_format_version": "0.2.0",
            "measurement_id": self.measurement_id,
            "report_id": self.run_id,
            "run_id": self.run_id,
            "test_name": self.test_name,
            "test_version": self.test_version,
            "input": self.input,
            "measurement_start_time": utc_timestamp(self.started),
            "test_runtime": round(self.runtime, 6),
            "probe_cc": self.probe_cc,
            "probe_asn": self.probe_asn,
            "probe_network_name": self.probe_network_name,
            "probe_ip": "127.0.0.1",  # OONI's convention: the real address is never stored
            "resolver_asn": self.resolver_asn,
            "software_name": SOFTWARE_NAME,
            "software_version": SOFTWARE_VERSION,
            "annotations": self.annotations,
            "test_keys": self.test_keys,
        }
