"""Turn one OONI-shaped record into rows of the observation tables (schema.sql).

One flattener serves our measurements, the control (helper) response embedded
in them, and OONI measurements imported from elsewhere, so analysis sees one
shape whatever the source.

Rows are dicts keyed by column name (the columns are schema.sql's; the writer
takes their order and types from there, probes/schema.py). A column a row does
not name is NULL.

A malformed field degrades that field, never the measurement: entries that
are not objects are skipped, values of the wrong type become NULL when
written (probes/store.py), a body whose base64 is broken is decoded as far as
it goes.

Per-record bounds (docs/schema.md, "Bounds"): the store must be able to write
any record in the probe's 32 MB of DuckDB memory, whatever a hostile server
made the probe record.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import json
import re
from typing import Any, Iterator
from urllib.parse import urlsplit

from core.net import split_endpoint

from .records import body_bytes, title_bytes

try:  # ~10x faster than json.dumps for the stored record; json is the fallback
    import orjson
except ImportError:  # pragma: no cover
    orjson = None

Row = dict[str, Any]

# The tables a record fills.
FLATTENED_TABLES = (
    "measurements", "dns_answers", "tcp_connects", "tls_handshakes", "http_transactions", "network_events",
    "throughput_samples", "ip_info", "packets",
)

PACKET_KEYS = ("transaction_id", "kind", "flow", "src", "sport", "dport", "proto", "ip_ttl", "ip_id", "tcp_flags", "length",
               "t", "baseline_ttl", "baseline_ip_id", "injected")

# --- Bounds on what one record writes -----------------------------------------
BODY_TEXT_CAP = 64 * 1024           # http_transactions.body: the first 64 KiB as text
EVENTS_PER_TRANSACTION = 64         # network events kept as they are (OONI keeps 64) ...
                                    # ... the rest merged into one event per operation
ROWS_PER_TABLE = 1024               # rows of one table from one record
LIST_CAP = 1024                     # entries of any list in the stored record JSON
STRING_CAP = 64 * 1024              # characters of any string in the stored record JSON / any text column
HEADERS_JSON_CAP = 64 * 1024        # http_transactions.headers
RECORD_JSON_CAP = 1024 * 1024       # measurements.record: largest test_keys entries dropped beyond this
TEXT_BUDGET = 4 * 1024 * 1024       # characters of text in one record's rows, measurements.record included:
SMALL_TEXT = 64                     # ... beyond it, longer strings are stored as NULL


def extract_title(body: bytes) -> str | None:
    raw = title_bytes(body[:BODY_TEXT_CAP * 2])
    if raw is None:
        return None
    return " ".join(raw.decode("utf-8", "replace").split())[:256] or None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The object entries of a list (anything else in the list is skipped)."""
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict):
                yield entry


def _endpoint(value: Any) -> tuple[str | None, int | None]:
    if not isinstance(value, str) or not value:
        return None, None
    return split_endpoint(value)


def _headers_json(headers: Any) -> str | None:
    if headers is None:
        return None
    if isinstance(headers, dict) and any(isinstance(v, dict) for v in headers.values()):
        headers = {k: _header_text(v) for k, v in headers.items()}
    text = _dumps_sorted(headers)
    if len(text) > STRING_CAP or text.count(",") >= LIST_CAP:  # see _stored_json
        text = json.dumps(_clip(headers, {}), ensure_ascii=False, sort_keys=True)
    if len(text) > HEADERS_JSON_CAP:
        return json.dumps({"x_dropped_by_store": f"{len(text)} characters of headers"})
    return text


def _header_text(value: Any) -> Any:
    """A header value as text: OONI writes a value that is not UTF-8 as a
    base64 object (df-001 MaybeBinaryData); the rules match text (a
    blockpage's Location, a censor's Server), so it is decoded, invalid bytes
    replaced."""
    if isinstance(value, dict) and value.get("format") == "base64":
        return body_bytes(value).decode("utf-8", "replace")
    return value


def _dumps_sorted(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, sort_keys=True)``, via orjson when it can."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except (TypeError, ValueError):
            pass
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


_OONI_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")


def _start_time(value: Any) -> dt.datetime | None:
    """OONI's ``2006-01-02 15:04:05``. Its exact shape goes through
    ``fromisoformat`` (10x faster than ``strptime``, the same datetime);
    anything else through ``strptime``, which also takes unpadded fields."""
    if not isinstance(value, str) or not value:
        return None
    try:
        if _OONI_TIME.fullmatch(value):
            return dt.datetime.fromisoformat(value)
        return dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def _url_parts(url: Any) -> tuple[str | None, str | None, int | None]:
    """(domain, scheme, port) of the input URL; None for what does not parse."""
    if not isinstance(url, str) or "://" not in url:
        return None, None, None
    return _url_parts_of(url) if len(url) <= _CACHED_TEXT else _url_parts_of.__wrapped__(url)


# Inputs and addresses repeat from measurement to measurement (a test list, a
# country's resolvers): their parses are cached, for texts up to this long.
_CACHED_TEXT = 2048


@functools.lru_cache(maxsize=8192)
def _url_parts_of(url: str) -> tuple[str | None, str | None, int | None]:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None, None, None
    try:
        port = parts.port
    except ValueError:
        port = None
    return host, parts.scheme, port or {"http": 80, "https": 443}.get(parts.scheme)


# --- Bounding a record -------------------------------------------------------


def _merge_events(events: Any, notes: dict[str, Any]) -> Any:
    """The first EVENTS_PER_TRANSACTION events of each transaction as they
    are; the rest merged into one event per (transaction, operation) with the
    bytes summed and the last time kept, so byte totals and the last-byte time
    (the slow-transfer rule) are unchanged. An endless stream of empty deflate
    blocks made 61,000 events and a 7.2 MB record."""
    if not isinstance(events, list) or len(events) <= EVENTS_PER_TRANSACTION:
        return events
    kept: list[Any] = []
    seen: dict[Any, int] = {}
    merged: dict[tuple, dict[str, Any]] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        txid = event.get("transaction_id")
        txid = txid if isinstance(txid, (int, str)) or txid is None else str(txid)
        seen[txid] = seen.get(txid, 0) + 1
        if seen[txid] <= EVENTS_PER_TRANSACTION:
            kept.append(event)
            continue
        operation = event.get("operation")
        key = (txid, operation if isinstance(operation, str) else None)
        into = merged.get(key)
        if into is None:
            into = merged[key] = {"operation": key[1], "num_bytes": 0, "t": None, "transaction_id": txid,
                                  "address": None, "x_merged_events": 0}
        size, t = event.get("num_bytes"), event.get("t")
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            into["num_bytes"] += size
        if isinstance(t, (int, float)) and not isinstance(t, bool) and (into["t"] is None or t > into["t"]):
            into["t"] = t
        into["address"] = event.get("address")
        into["x_merged_events"] += 1
    if not merged:
        return events
    notes["network_events_merged"] = sum(m["x_merged_events"] for m in merged.values())
    return kept + list(merged.values())


def _clip(value: Any, notes: dict[str, Any]) -> Any:
    """``value`` with lists cut to LIST_CAP entries and strings to STRING_CAP
    characters (copies only what changes)."""
    if isinstance(value, str):
        if len(value) > STRING_CAP:
            notes["strings_cut"] = notes.get("strings_cut", 0) + 1
            return value[:STRING_CAP]
        return value
    if isinstance(value, list):
        cut = len(value) > LIST_CAP
        if cut:
            notes["lists_cut"] = notes.get("lists_cut", 0) + 1
        out = [_clip(v, notes) for v in value[:LIST_CAP]]
        return out if cut or any(a is not b for a, b in zip(out, value)) else value
    if isinstance(value, dict):
        out = {k: _clip(v, notes) for k, v in value.items()}
        return out if any(out[k] is not value[k] for k in value) else value
    return value


def _within_caps(value: Any) -> bool:
    """Whether ``_clip`` would leave ``value`` as it is (no string over
    STRING_CAP, no list over LIST_CAP), found without copying anything."""
    if isinstance(value, str):
        return len(value) <= STRING_CAP
    stack = [value]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            entries = container.values()
        elif isinstance(container, list):
            if len(container) > LIST_CAP:
                return False
            entries = container
        else:
            continue
        for entry in entries:
            if isinstance(entry, str):
                if len(entry) > STRING_CAP:
                    return False
            elif isinstance(entry, (dict, list)):
                stack.append(entry)
    return True


def _without_bodies(record: dict[str, Any]) -> dict[str, Any]:
    """The record as stored in ``measurements.record``: response bodies live
    once, in ``http_transactions.body`` (first 64 KiB; length and SHA-256 of
    the whole body are kept). Storing them twice doubled the file and cost the
    probe ~12 MB of RSS per 10,000 URLs."""
    keys = _dict(record.get("test_keys"))
    requests = keys.get("requests")
    if not requests or not isinstance(requests, list):
        return record
    slim = []
    for r in requests:
        response = r.get("response") if isinstance(r, dict) else None
        if isinstance(response, dict) and "body" in response:
            response = {k: v for k, v in response.items() if k != "body"} | {"x_body_in": "http_transactions.body"}
            r = r | {"response": response}
        slim.append(r)
    return record | {"test_keys": keys | {"requests": slim}}


def _json_length(value: Any) -> int:
    """Bytes of ``value`` as JSON, or more than TEXT_BUDGET when orjson
    cannot write it (lone surrogates, huge integers...)."""
    if orjson is not None:
        try:
            return len(orjson.dumps(value))
        except (TypeError, ValueError):
            pass
    return TEXT_BUDGET + 1


def _text_budget(sides: list[dict[str, list[Row]]], notes: dict[str, Any]) -> None:
    """At most TEXT_BUDGET characters of text in one record's rows (1,024
    hops with 64 KiB bodies and headers each made a 128 MB transaction that
    DuckDB could not commit in 32 MB): past the budget, strings longer than
    SMALL_TEXT become NULL (ids, sides, addresses and failures are shorter)."""
    used = RECORD_JSON_CAP  # measurements.record, built last
    # Almost every record is far below the budget, and the rows' JSON says so
    # at C speed: its UTF-8 length bounds the characters of every string in
    # it (measurement ids and non-strings included: an upper bound).
    if used + _json_length(sides) <= TEXT_BUDGET:
        return
    dropped = 0
    for table_rows in (r for side in sides for r in side.values()):
        for row in table_rows:
            for key, value in row.items():
                if isinstance(value, str) and key != "measurement_id":
                    if used + len(value) > TEXT_BUDGET and len(value) > SMALL_TEXT:
                        row[key] = None
                        dropped += 1
                    else:
                        used += len(value)
    if dropped:
        notes["text_dropped"] = dropped


def _dumps(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)``, through orjson when it can
    (lone surrogates, non-string keys and huge integers fall back to json)."""
    if orjson is not None:
        try:
            return orjson.dumps(value).decode()
        except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
            pass
    return json.dumps(value, ensure_ascii=False)


def _stored_json(record: dict[str, Any], notes: dict[str, Any]) -> str:
    """``measurements.record``: the record without bodies, clipped, with what
    the store cut noted in ``test_keys.x_store_caps``; at most RECORD_JSON_CAP
    characters (the largest test_keys entries are dropped beyond it)."""
    stored = _without_bodies(record)
    text: str | None = _dumps(stored)
    # Clipping copies the record, and is rarely needed: a string over
    # STRING_CAP makes the JSON text longer than that, and a list over LIST_CAP
    # entries takes LIST_CAP commas; even then ``_within_caps`` (no copies)
    # usually finds nothing to cut.
    if (len(text) > STRING_CAP or text.count(",") >= LIST_CAP) and not _within_caps(stored):
        stored = _clip(stored, notes)
        text = None
    keys = _dict(stored.get("test_keys"))

    def dumps() -> str:
        body = stored if not notes else stored | {"test_keys": keys | {"x_store_caps": notes}}
        return _dumps(body)

    if text is None or notes:
        text = dumps()
    if len(text) > RECORD_JSON_CAP:
        sizes = sorted(((len(_dumps(v)), k) for k, v in keys.items()), reverse=True)
        keys = dict(keys)
        dropped = notes.setdefault("keys_dropped", {})
        for size, key in sizes:
            keys[key] = None
            dropped[key] = size
            stored = stored | {"test_keys": keys}
            text = dumps()
            if len(text) <= RECORD_JSON_CAP:
                break
        if len(text) > RECORD_JSON_CAP:  # the envelope itself is huge: keep what identifies it
            stored = {k: stored.get(k) for k in ("measurement_id", "run_id", "report_id", "test_name", "input")}
            stored = _clip(stored, {}) | {"test_keys": {"x_store_caps": notes | {"envelope_dropped": len(text)}}}
            text = json.dumps(stored, ensure_ascii=False)[:RECORD_JSON_CAP]
    return text


# --- Rows ------------------------------------------------------------------


def flatten(record: dict[str, Any], category_code: str | None = None) -> dict[str, list[Row]]:
    """Rows for every table, keyed by table name, for one record."""
    rows: dict[str, list[Row]] = {name: [] for name in FLATTENED_TABLES}
    notes: dict[str, Any] = {}
    mid = record["measurement_id"]
    keys = _dict(record.get("test_keys"))
    events = _merge_events(keys.get("network_events"), notes)
    if events is not keys.get("network_events"):
        keys = keys | {"network_events": events}
        record = record | {"test_keys": keys}
    _probe_side(mid, keys, rows)
    control = keys.get("control")
    control_rows: dict[str, list[Row]] = {name: [] for name in FLATTENED_TABLES}
    if isinstance(control, dict):
        _control_side(mid, control, control_rows)
    for side in (rows, control_rows):  # each side keeps its first ROWS_PER_TABLE rows
        for name, table_rows in side.items():
            if len(table_rows) > ROWS_PER_TABLE:
                dropped = notes.setdefault("rows_dropped", {})
                dropped[name] = dropped.get(name, 0) + len(table_rows) - ROWS_PER_TABLE
                del table_rows[ROWS_PER_TABLE:]
    _text_budget([control_rows, rows], notes)  # the control's few rows first: analysis compares with them
    for name, table_rows in control_rows.items():
        rows[name].extend(table_rows)
    url = record.get("input") or ""
    domain, scheme, port = _url_parts(url)
    annotations = _dict(record.get("annotations"))
    rows["measurements"].append({
        "measurement_id": mid,
        "run_id": record.get("run_id") or record.get("report_id"),
        "test_name": record.get("test_name"),
        "test_version": record.get("test_version"),
        "input": url,
        "domain": domain,
        "scheme": scheme,
        "port": port,
        "category_code": category_code or annotations.get("category_code"),
        "start_time": _start_time(record.get("measurement_start_time")),
        "runtime": record.get("test_runtime"),
        "probe_cc": record.get("probe_cc"),
        "probe_asn": record.get("probe_asn"),
        "resolver_asn": record.get("resolver_asn"),
        "software_name": record.get("software_name"),
        "software_version": record.get("software_version"),
        "control_failure": keys.get("control_failure") if (control or keys.get("control_failure")) else "no_control",
        "control_helper": keys.get("x_control_helper"),
        "probe_network_ok": keys.get("x_probe_network_ok"),
        "record": _stored_json(record, notes),
        "ooni_blocking": _ooni_blocking(keys.get("blocking")),
        "ooni_accessible": keys.get("accessible"),
    })
    return rows


def _ooni_blocking(value: Any) -> str | None:
    """OONI's ``test_keys.blocking`` as text: ``false`` (no blocking), or the
    kind (``dns``, ``tcp_ip``, ``http-failure``, ``http-diff``); NULL when OONI
    could not tell (or the record is ours)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else None


def _dns_value(answer: dict[str, Any]) -> Any:
    return answer.get("ipv4") or answer.get("ipv6") or answer.get("hostname") or answer.get("value")


def _probe_side(mid: str, keys: dict[str, Any], rows: dict[str, list[Row]]) -> None:
    for q in _dicts(keys.get("queries")):
        base = {
            "measurement_id": mid, "side": "probe", "transaction_id": q.get("transaction_id"), "engine": q.get("engine"),
            "resolver": q.get("resolver_address"), "hostname": q.get("hostname"), "query_type": q.get("query_type"),
            "response_index": q.get("x_response_index", 0), "failure": q.get("failure"), "rcode": q.get("rcode"),
            "t0": q.get("t0"), "t": q.get("t"),
        }
        answers = list(_dicts(q.get("answers")))
        if not answers:
            rows["dns_answers"].append(base)
        for a in answers:
            rows["dns_answers"].append(base | {"answer_type": a.get("answer_type"), "answer": _dns_value(a), "ttl": a.get("ttl")})
    for c in _dicts(keys.get("tcp_connect")):
        status = _dict(c.get("status"))
        rows["tcp_connects"].append({
            "measurement_id": mid, "side": "probe", "transaction_id": c.get("transaction_id"), "ip": c.get("ip"),
            "port": c.get("port"), "success": bool(status.get("success")), "failure": status.get("failure"),
            "t0": c.get("t0"), "t": c.get("t"), "attempt": c.get("x_attempt"),
        })
    for h in _dicts(keys.get("tls_handshakes")):
        ip, port = _endpoint(h.get("address"))
        rows["tls_handshakes"].append({
            "measurement_id": mid, "side": "probe", "transaction_id": h.get("transaction_id"), "ip": ip, "port": port,
            "server_name": h.get("server_name"), "success": h.get("failure") is None, "failure": h.get("failure"),
            "tls_version": h.get("tls_version"), "cipher_suite": h.get("cipher_suite"),
            "cert_valid": h.get("x_cert_valid"), "cert_error": h.get("x_cert_error"),
            "cert_subject": h.get("x_cert_subject"), "cert_issuer": h.get("x_cert_issuer"),
            "cert_sha256": h.get("x_cert_sha256"), "cert_not_after": h.get("x_cert_not_after"),
            "t0": h.get("t0"), "t": h.get("t"), "attempt": h.get("x_attempt"),
        })
    requests = list(_dicts(keys.get("requests")))
    for position, r in enumerate(requests):
        req = _dict(r.get("request"))
        resp = _dict(r.get("response"))
        index = r.get("x_redirect_index")
        if index is None:  # OONI lists the last request first
            index = len(requests) - 1 - position
        body = body_bytes(resp.get("body"))
        length = r.get("x_body_length")
        rows["http_transactions"].append({
            "measurement_id": mid, "side": "probe", "transaction_id": r.get("transaction_id"), "redirect_index": index,
            "url": req.get("url"), "method": req.get("method"), "address": r.get("x_address"),
            "failure": r.get("failure"), "status_code": resp.get("code"), "headers": _headers_json(resp.get("headers")),
            "title": r.get("x_title") if "x_title" in r else extract_title(body),
            "body_length": length if length is not None else (len(body) if resp else None),
            "body_truncated": resp.get("body_is_truncated"),
            "body_sha256": r.get("x_body_sha256") or (hashlib.sha256(body).hexdigest() if resp else None),
            "body": body[:BODY_TEXT_CAP].decode("utf-8", "replace") if resp else None,
            "t0": r.get("t0"), "t": r.get("t"), "attempt": r.get("x_attempt"),
        })
    for e in _dicts(keys.get("network_events")):
        rows["network_events"].append({
            "measurement_id": mid, "side": "probe", "transaction_id": e.get("transaction_id"),
            "operation": e.get("operation"), "address": e.get("address"), "num_bytes": e.get("num_bytes"), "t": e.get("t"),
        })
    for s in _dicts(keys.get("x_throughput")):
        rows["throughput_samples"].append(_throughput(mid, s, s.get("side", "probe"), s.get("variant")))
    for p in _dicts(keys.get("x_packets")):  # the packet probes' and the capture's (probes/packets.py)
        rows["packets"].append({"measurement_id": mid, "side": "probe"} | {k: p.get(k) for k in PACKET_KEYS})


def _throughput(mid: str, s: dict[str, Any], side: Any, variant: Any) -> Row:
    return {
        "measurement_id": mid, "side": side, "variant": variant, "attempt": s.get("attempt"), "ip": s.get("ip"),
        "server_name": s.get("server_name"), "failure": s.get("failure"), "bytes": s.get("bytes"),
        "seconds": s.get("seconds"), "kbit_per_s": s.get("kbit_per_s"),
    }


def _answer_type(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return _answer_type_of(value) if len(value) <= _CACHED_TEXT else _answer_type_of.__wrapped__(value)


@functools.lru_cache(maxsize=8192)
def _answer_type_of(value: str) -> str:
    try:
        return "AAAA" if ipaddress.ip_address(value).version == 6 else "A"
    except ValueError:
        return "CNAME"


def _control_side(mid: str, control: dict[str, Any], rows: dict[str, list[Row]]) -> None:
    """The OONI test-helper response (ts-017), plus our x_ extensions."""
    dns = _dict(control.get("dns"))
    addrs = dns.get("addrs") if isinstance(dns.get("addrs"), list) else []
    base = {"measurement_id": mid, "side": "control", "engine": "th", "query_type": "ANY", "response_index": 0,
            "failure": dns.get("failure")}
    if not addrs:
        rows["dns_answers"].append(base)
    for a in addrs:
        rows["dns_answers"].append(base | {"answer_type": _answer_type(a), "answer": a})
    for q in _dicts(control.get("x_doh")):
        doh = {
            "measurement_id": mid, "side": "control", "engine": "doh", "resolver": q.get("resolver_address"),
            "hostname": q.get("hostname"), "query_type": q.get("query_type"), "response_index": q.get("x_response_index", 0),
            "failure": q.get("failure"), "rcode": q.get("rcode"), "t0": q.get("t0"), "t": q.get("t"),
        }
        answers = list(_dicts(q.get("answers"))) or [{}]
        for a in answers:
            rows["dns_answers"].append(doh | {"answer_type": a.get("answer_type"),
                                              "answer": a.get("ipv4") or a.get("ipv6") or a.get("hostname"), "ttl": a.get("ttl")})
    for endpoint, c in _dict(control.get("tcp_connect")).items():
        c = _dict(c)
        ip, port = _endpoint(endpoint)
        rows["tcp_connects"].append({"measurement_id": mid, "side": "control", "ip": ip, "port": port,
                                     "success": bool(c.get("status")), "failure": c.get("failure")})
    for endpoint, h in _dict(control.get("tls_handshake")).items():
        h = _dict(h)
        ip, port = _endpoint(endpoint)
        rows["tls_handshakes"].append({
            "measurement_id": mid, "side": "control", "ip": ip, "port": port, "server_name": h.get("server_name"),
            "success": bool(h.get("status")), "failure": h.get("failure"), "tls_version": h.get("x_tls_version"),
            "cipher_suite": h.get("x_cipher_suite"), "cert_valid": h.get("x_cert_valid"), "cert_error": h.get("x_cert_error"),
            "cert_subject": h.get("x_cert_subject"), "cert_issuer": h.get("x_cert_issuer"),
            "cert_sha256": h.get("x_cert_sha256"), "cert_not_after": h.get("x_cert_not_after"),
        })
    http = control.get("http_request")
    if isinstance(http, dict):
        code = http.get("status_code")
        length = http.get("body_length")
        rows["http_transactions"].append({
            "measurement_id": mid, "side": "control", "redirect_index": 0, "url": http.get("x_final_url"), "method": "GET",
            "failure": http.get("failure"), "status_code": code if code not in (None, -1) else None,
            "headers": _headers_json(http.get("headers")), "title": http.get("title"),
            "body_length": length if length not in (None, -1) else None, "body_truncated": http.get("x_body_truncated"),
            "body_sha256": http.get("x_body_sha256"),
        })
    for s in _dicts(control.get("x_throughput")):
        rows["throughput_samples"].append(_throughput(mid, s, "control", s.get("variant", "helper")))
    for ip, info in _dict(control.get("ip_info")).items():
        info = _dict(info)
        rows["ip_info"].append({"measurement_id": mid, "side": "control", "ip": ip, "asn": info.get("asn"),
                                "flags": info.get("flags")})


def iter_table_rows(records: list[tuple[dict[str, Any], str | None]]) -> Iterator[tuple[str, list[Row]]]:
    """Flatten many records, grouping rows per table (for batched inserts)."""
    merged: dict[str, list[Row]] = {name: [] for name in FLATTENED_TABLES}
    for record, category in records:
        for name, table_rows in flatten(record, category).items():
            merged[name].extend(table_rows)
    for name, table_rows in merged.items():
        if table_rows:
            yield name, table_rows
