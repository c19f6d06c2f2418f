"""Plain-words explanation of a verdict row (for `vantage results show`)."""

from __future__ import annotations

import json
from typing import Any

_METHOD = {
    "dns.nxdomain": "the probe's resolver said the name does not exist, while the control resolved it",
    "dns.bogon": "the probe's resolver answered with a private or reserved address ({bogon})",
    "dns.injected": "forged DNS answers were seen on the path (first {first_response}, later {late_response})",
    "dns.inconsistent": "the probe's resolver gave addresses the control did not, and nothing vouched for them",
    "dns.timeout": "the probe's DNS lookups got no answer ({probe_failure}) while the control resolved the name",
    "tcp.reset": "connections to {endpoint} were refused, while the control connected",
    "tcp.timeout": "connections to {endpoint} timed out, while the control connected",
    "tls.reset": "the TLS handshake with {endpoint} was cut ({probe_failure}), while the control's worked",
    "tls.timeout": "the TLS handshake with {endpoint} stalled, while the control's worked",
    "tls.mitm": "the certificate presented at {endpoint} was not valid ({certificate_error}, issuer {issuer}); the control saw a valid one",
    "http.reset": "the HTTP exchange was cut ({probe_failure}) after connecting, while the control fetched the page",
    "http.timeout": "the HTTP exchange timed out after connecting, while the control fetched the page",
    "http.blockpage": "the page matched the known blockpage fingerprint {fingerprint}",
    "http.diff": "the page differed from the control's (status {probe_status} vs {control_status}, title {probe_title!r} vs {control_title!r})",
    "throttle.sni": "transfers naming this site were much slower than the same transfer under another name",
    "throttle.ip": "transfers to this server were much slower than the control's",
}

_STATUS = {
    "ok": "No sign of interference: the probe reached the site as the control did.",
    "down": "The site was unreachable from the control too, so this is not censorship.",
    "server_side": "The site itself refused this network (a geo-block or challenge page served over the site's own identity).",
    "inconclusive": "Not enough evidence to decide.",
}


class _Soft(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def describe(row: dict[str, Any]) -> str:
    """One or two sentences; ``row`` needs status/method/confidence/evidence."""
    evidence = row.get("evidence") or {}
    if isinstance(evidence, str):
        try:
            evidence = json.loads(evidence)
        except ValueError:
            evidence = {}
    compared = evidence.get("compared") or {}
    rule = evidence.get("rule") or "?"
    status = row.get("status")
    method = row.get("method")
    if status in ("blocked", "throttled") and method in _METHOD:
        text = "Blocked: " if status == "blocked" else "Throttled: "
        text += _METHOD[method].format_map(_Soft({k: v for k, v in compared.items() if v is not None})) + "."
        if row.get("confirmed"):
            text += " A known censorship fingerprint matched, so this is confirmed."
    elif status == "throttled":
        text = "Throttled: transfers were much slower than expected."
    else:
        text = _STATUS.get(status, f"Status {status}.")
        if compared.get("evidence") == "probe offline":
            text = "Inconclusive: the probe itself looked offline, so nothing can be said about the site."
        elif rule == "no_control":
            text = "Inconclusive: no control measurement to compare with."
    confidence = row.get("confidence")
    if confidence is not None and status != "inconclusive":
        text += f" (rule {rule}, confidence {float(confidence):.2f})"
    else:
        text += f" (rule {rule})"
    return text
