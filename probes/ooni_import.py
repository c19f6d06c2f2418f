"""Convert an OONI Web Connectivity measurement into a Vantage record.

Vantage records already use OONI's field names, so this is mostly identity.
What differs, and why:

* ``engine: getaddrinfo`` is what Vantage calls ``system``.
* OONI keeps late DNS responses apart (``x_dns_duplicate_responses``); Vantage
  keeps them in ``queries`` with ``x_response_index >= 1`` on the same
  transaction.
* OONI's requests carry the endpoint in ``address``; Vantage in ``x_address``.
  Their order (last hop first) is left alone: the flattener numbers hops from
  the end when ``x_redirect_index`` is absent.
* OONI has no measurement id of ours: one is derived from the report id and
  input (and, when the report id is empty, from the measurement's content, so
  distinct measurements never collide).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any


def _measurement_id(ooni: dict[str, Any]) -> str:
    report = ooni.get("report_id") or ""
    key = f"{report}\0{ooni.get('input') or ''}\0{ooni.get('measurement_start_time') or ''}"
    if not report:
        key += "\0" + json.dumps(ooni, sort_keys=True, ensure_ascii=False)
    return "ooni-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _query(q: dict[str, Any], response_index: int) -> dict[str, Any]:
    q = dict(q)
    if q.get("engine") == "getaddrinfo":
        q["engine"] = "system"
    q.setdefault("x_response_index", response_index)
    return q


def record_from_ooni(ooni: dict[str, Any]) -> dict[str, Any]:
    """A record for probes.store.write_all; the input dict is not modified."""
    record = copy.deepcopy(ooni)
    keys = record.setdefault("test_keys", {}) or {}
    record["test_keys"] = keys
    record["measurement_id"] = ooni.get("measurement_uid") or _measurement_id(ooni)
    record.setdefault("run_id", ooni.get("report_id") or None)
    queries = [_query(q, 0) for q in keys.get("queries") or []]
    queries += [_query(q, 1) for q in keys.get("x_dns_duplicate_responses") or []]
    keys["queries"] = queries
    for request in keys.get("requests") or []:
        if "x_address" not in request and request.get("address"):
            request["x_address"] = request["address"]
    # OONI measurements say nothing about the probe's own connectivity.
    keys.setdefault("x_probe_network_ok", None)
    return record
