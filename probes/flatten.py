"""Turn one OONI-shaped record into rows of the observation tables (schema.sql).

One flattener serves our measurements, the control (helper) response embedded
in them, and OONI measurements imported from elsewhere, so analysis sees one
shape whatever the source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
from typing import Any, Iterator
from urllib.parse import urlsplit

from .records import body_bytes, title_bytes

BODY_TEXT_CAP = 64 * 1024

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "run_inputs": ("run_id", "position", "input", "category_code"),
    "measurements": (
        "measurement_id", "run_id", "test_name", "test_version", "input", "domain", "scheme", "port",
        "category_code", "start_time", "runtime", "probe_cc", "probe_asn", "resolver_asn",
        "software_name", "software_version", "control_failure", "control_helper", "probe_network_ok", "record",
    ),
    "dns_answers": (
        "measurement_id", "side", "transaction_id", "engine", "resolver", "hostname", "query_type",
        "response_index", "failure", "rcode", "answer_type", "answer", "ttl", "t0", "t",
    ),
    "tcp_connects": ("measurement_id", "side", "transaction_id", "ip", "port", "success", "failure", "t0", "t"),
    "tls_handshakes": (
        "measurement_id", "side", "transaction_id", "ip", "port", "server_name", "success", "failure",
        "tls_version", "cipher_suite", "cert_valid", "cert_error", "cert_subject", "cert_issuer",
        "cert_sha256", "cert_not_after", "t0", "t",
    ),
    "http_transactions": (
        "measurement_id", "side", "transaction_id", "redirect_index", "url", "method", "address", "failure",
        "status_code", "headers", "title", "body_length", "body_truncated", "body_sha256", "body", "t0", "t",
    ),
    "network_events": ("measurement_id", "side", "transaction_id", "operation", "address", "num_bytes", "t"),
    "throughput_samples": (
        "measurement_id", "side", "variant", "attempt", "ip", "server_name", "failure", "bytes", "seconds", "kbit_per_s",
    ),
}

OBSERVATION_TABLES = tuple(name for name in TABLE_COLUMNS if name != "run_inputs")

def extract_title(body: bytes) -> str | None:
    raw = title_bytes(body[:BODY_TEXT_CAP * 2])
    if raw is None:
        return None
    return " ".join(raw.decode("utf-8", "replace").split())[:256] or None


def split_endpoint(endpoint: str) -> tuple[str, int | None]:
    """'1.2.3.4:443' or '[::1]:443' -> (ip, port)."""
    if endpoint.startswith("["):
        host, _, port = endpoint[1:].partition("]:")
        return host, int(port) if port else None
    host, sep, port = endpoint.rpartition(":")
    if not sep or ":" in host:
        return endpoint, None
    return host, int(port)


def _headers_json(headers: Any) -> str | None:
    if headers is None:
        return None
    return json.dumps(headers, ensure_ascii=False, sort_keys=True)


def _start_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def _without_bodies(record: dict[str, Any]) -> dict[str, Any]:
    """The record as stored in ``measurements.record``: response bodies live
    once, in ``http_transactions.body`` (first 64 KiB; length and SHA-256 of
    the whole body are kept). Storing them twice doubled the file and cost the
    probe ~12 MB of RSS per 10,000 URLs."""
    requests = (record.get("test_keys") or {}).get("requests")
    if not requests:
        return record
    slim = []
    for r in requests:
        response = r.get("response")
        if response and "body" in response:
            response = {k: v for k, v in response.items() if k != "body"} | {"x_body_in": "http_transactions.body"}
            r = r | {"response": response}
        slim.append(r)
    return record | {"test_keys": record["test_keys"] | {"requests": slim}}


def flatten(record: dict[str, Any], category_code: str | None = None) -> dict[str, list[tuple]]:
    """Rows for every table, keyed by table name, for one record."""
    rows: dict[str, list[tuple]] = {name: [] for name in OBSERVATION_TABLES}
    mid = record["measurement_id"]
    keys = record.get("test_keys") or {}
    url = record.get("input") or ""
    parts = urlsplit(url) if "://" in url else None
    control = keys.get("control")
    rows["measurements"].append((
        mid, record.get("run_id") or record.get("report_id"), record.get("test_name"), record.get("test_version"),
        url, parts.hostname if parts else None, parts.scheme if parts else None,
        (parts.port or {"http": 80, "https": 443}.get(parts.scheme)) if parts else None,
        category_code or record.get("annotations", {}).get("category_code"),
        _start_time(record.get("measurement_start_time")), record.get("test_runtime"),
        record.get("probe_cc"), record.get("probe_asn"), record.get("resolver_asn"),
        record.get("software_name"), record.get("software_version"),
        keys.get("control_failure") if (control or keys.get("control_failure")) else "no_control",
        keys.get("x_control_helper"), keys.get("x_probe_network_ok"),
        json.dumps(_without_bodies(record), ensure_ascii=False),
    ))
    _probe_side(mid, keys, rows)
    if isinstance(control, dict):
        _control_side(mid, control, rows)
    return rows


def _probe_side(mid: str, keys: dict[str, Any], rows: dict[str, list[tuple]]) -> None:
    for q in keys.get("queries") or []:
        base = (
            mid, "probe", q.get("transaction_id"), q.get("engine"), q.get("resolver_address"), q.get("hostname"),
            q.get("query_type"), q.get("x_response_index", 0), q.get("failure"), q.get("rcode"),
        )
        answers = q.get("answers") or []
        if not answers:
            rows["dns_answers"].append(base + (None, None, None, q.get("t0"), q.get("t")))
        for a in answers:
            value = a.get("ipv4") or a.get("ipv6") or a.get("hostname") or a.get("value")
            rows["dns_answers"].append(base + (a.get("answer_type"), value, a.get("ttl"), q.get("t0"), q.get("t")))
    for c in keys.get("tcp_connect") or []:
        status = c.get("status") or {}
        rows["tcp_connects"].append((
            mid, "probe", c.get("transaction_id"), c.get("ip"), c.get("port"),
            bool(status.get("success")), status.get("failure"), c.get("t0"), c.get("t"),
        ))
    for h in keys.get("tls_handshakes") or []:
        ip, port = split_endpoint(h.get("address") or "")
        rows["tls_handshakes"].append((
            mid, "probe", h.get("transaction_id"), ip, port, h.get("server_name"), h.get("failure") is None,
            h.get("failure"), h.get("tls_version"), h.get("cipher_suite"), h.get("x_cert_valid"), h.get("x_cert_error"),
            h.get("x_cert_subject"), h.get("x_cert_issuer"), h.get("x_cert_sha256"), h.get("x_cert_not_after"),
            h.get("t0"), h.get("t"),
        ))
    requests = keys.get("requests") or []
    for position, r in enumerate(requests):
        req = r.get("request") or {}
        resp = r.get("response") or {}
        index = r.get("x_redirect_index")
        if index is None:  # OONI lists the last request first
            index = len(requests) - 1 - position
        body = body_bytes(resp.get("body"))
        length = r.get("x_body_length")
        rows["http_transactions"].append((
            mid, "probe", r.get("transaction_id"), index, req.get("url"), req.get("method"), r.get("x_address"),
            r.get("failure"), resp.get("code"), _headers_json(resp.get("headers")),
            r.get("x_title") if "x_title" in r else extract_title(body),
            length if length is not None else (len(body) if resp else None),
            resp.get("body_is_truncated"),
            r.get("x_body_sha256") or (hashlib.sha256(body).hexdigest() if resp else None),
            body[:BODY_TEXT_CAP].decode("utf-8", "replace") if resp else None,
            r.get("t0"), r.get("t"),
        ))
    for e in keys.get("network_events") or []:
        rows["network_events"].append((
            mid, "probe", e.get("transaction_id"), e.get("operation"), e.get("address"), e.get("num_bytes"), e.get("t"),
        ))
    for s in keys.get("x_throughput") or []:
        rows["throughput_samples"].append((
            mid, s.get("side", "probe"), s.get("variant"), s.get("attempt"), s.get("ip"), s.get("server_name"),
            s.get("failure"), s.get("bytes"), s.get("seconds"), s.get("kbit_per_s"),
        ))


def _answer_type(value: str) -> str:
    try:
        return "AAAA" if ipaddress.ip_address(value).version == 6 else "A"
    except ValueError:
        return "CNAME"


def _control_side(mid: str, control: dict[str, Any], rows: dict[str, list[tuple]]) -> None:
    """The OONI test-helper response (ts-017), plus our x_ extensions."""
    dns = control.get("dns") or {}
    addrs = dns.get("addrs") or []
    base = (mid, "control", None, "th", None, None, "ANY", 0, dns.get("failure"), None)
    if not addrs:
        rows["dns_answers"].append(base + (None, None, None, None, None))
    for a in addrs:
        rows["dns_answers"].append(base + (_answer_type(a), a, None, None, None))
    for q in control.get("x_doh") or []:
        for a in q.get("answers") or [{}]:
            value = a.get("ipv4") or a.get("ipv6") or a.get("hostname")
            rows["dns_answers"].append((
                mid, "control", None, "doh", q.get("resolver_address"), q.get("hostname"), q.get("query_type"),
                q.get("x_response_index", 0), q.get("failure"), q.get("rcode"), a.get("answer_type"), value,
                a.get("ttl"), q.get("t0"), q.get("t"),
            ))
    for endpoint, c in (control.get("tcp_connect") or {}).items():
        ip, port = split_endpoint(endpoint)
        rows["tcp_connects"].append((mid, "control", None, ip, port, bool(c.get("status")), c.get("failure"), None, None))
    for endpoint, h in (control.get("tls_handshake") or {}).items():
        ip, port = split_endpoint(endpoint)
        rows["tls_handshakes"].append((
            mid, "control", None, ip, port, h.get("server_name"), bool(h.get("status")), h.get("failure"),
            h.get("x_tls_version"), h.get("x_cipher_suite"), h.get("x_cert_valid"), h.get("x_cert_error"),
            h.get("x_cert_subject"), h.get("x_cert_issuer"), h.get("x_cert_sha256"), h.get("x_cert_not_after"),
            None, None,
        ))
    http = control.get("http_request")
    if isinstance(http, dict):
        code = http.get("status_code")
        length = http.get("body_length")
        rows["http_transactions"].append((
            mid, "control", None, 0, http.get("x_final_url"), "GET", None, http.get("failure"),
            code if code not in (None, -1) else None, _headers_json(http.get("headers")), http.get("title"),
            length if length not in (None, -1) else None, http.get("x_body_truncated"), http.get("x_body_sha256"),
            None, None, None,
        ))
    for s in control.get("x_throughput") or []:
        rows["throughput_samples"].append((
            mid, "control", s.get("variant", "helper"), s.get("attempt"), s.get("ip"), s.get("server_name"),
            s.get("failure"), s.get("bytes"), s.get("seconds"), s.get("kbit_per_s"),
        ))


def iter_table_rows(records: list[tuple[dict[str, Any], str | None]]) -> Iterator[tuple[str, list[tuple]]]:
    """Flatten many records, grouping rows per table (for batched inserts)."""
    merged: dict[str, list[tuple]] = {name: [] for name in OBSERVATION_TABLES}
    for record, category in records:
        for name, table_rows in flatten(record, category).items():
            merged[name].extend(table_rows)
    for name, table_rows in merged.items():
        if table_rows:
            yield name, table_rows
