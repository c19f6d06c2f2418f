"""One stored Vantage record as an OONI measurement (df-000 base format).

Shared by ``vantage export ooni`` (analysis/export.py, which adds our verdict)
and ``vantage upload`` (probes/upload.py, which sends the measurement to a
collector): both need the same envelope, and neither package may import the
other. The stored record is OONI-shaped already; this undoes what the
importer (probes/ooni_import.py) does. See analysis/export.py for the list.
"""

from __future__ import annotations

from typing import Any


# Our verdict as OONI's (blocking, accessible): ts-017's combinations.
_BLOCKING_OF_LAYER = {"dns": "dns", "tcp": "tcp_ip", "tls": "http-failure", "http": "http-failure"}


def ooni_verdict(status: str | None, layer: str | None, method: str | None) -> tuple[Any, Any]:
    """(blocking, accessible) for one of our verdicts. ``throttled``,
    ``server_side`` and ``inconclusive`` have no OONI equivalent: null, null."""
    if status == "ok":
        return False, True
    if status == "down":
        return False, False
    if status == "blocked":
        if method == "http.diff" or method == "http.blockpage":
            return "http-diff", False
        return _BLOCKING_OF_LAYER.get(layer or "", "http-failure"), False
    return None, None


def to_ooni(record: dict[str, Any], bodies: list[str | None], verdict: tuple | None = None,
            category_code: str | None = None) -> dict[str, Any]:
    """One stored record (``measurements.record``) as an OONI measurement.
    ``bodies``: the probe's ``http_transactions.body`` of the record, in the
    order the requests are listed; ``verdict``: (status, layer, method)."""
    out = {k: v for k, v in record.items() if k != "measurement_id"}
    out["x_measurement_id"] = record.get("measurement_id")
    out.setdefault("report_id", record.get("run_id"))
    out.setdefault("data_format_version", "0.2.0")
    out.setdefault("software_name", "vantage")
    out["probe_ip"] = "127.0.0.1"
    annotations = out.get("annotations") if isinstance(out.get("annotations"), dict) else {}
    if category_code and "category_code" not in annotations:
        annotations = annotations | {"category_code": category_code}
    out["annotations"] = annotations
    keys = dict(record.get("test_keys") or {})
    queries, late = [], []
    for q in keys.get("queries") or []:
        if isinstance(q, dict):
            if q.get("engine") == "system":
                q = q | {"engine": "getaddrinfo"}
            if isinstance(q.get("x_response_index"), int) and q["x_response_index"] >= 1:
                late.append(q)
                continue
        queries.append(q)
    if "queries" in keys:
        keys["queries"] = queries
    if late:
        keys["x_dns_duplicate_responses"] = late
    requests = keys.get("requests")
    if isinstance(requests, list):
        bodies_left = iter(bodies)
        restored = []
        for r in requests:
            if isinstance(r, dict):
                body = next(bodies_left, None)
                if r.get("x_address") and not r.get("address"):
                    r = r | {"address": r["x_address"]}
                response = r.get("response")
                if isinstance(response, dict) and response.get("x_body_in"):
                    response = {k: v for k, v in response.items() if k != "x_body_in"} | {"body": body}
                    r = r | {"response": response}
            restored.append(r)
        keys["requests"] = restored
    if verdict is not None and verdict[0] is not None:
        status, layer, method = verdict
        keys["blocking"], keys["accessible"] = ooni_verdict(status, layer, method)
        keys["x_verdict"] = {"status": status, "layer": layer, "method": method}
    out["test_keys"] = keys
    return out
