"""Builders of observation records for the analysis tests.

Each helper returns entries built with probes.records, so the fixtures have
exactly the shape the probe writes; ``web()`` assembles a web_connectivity
record with a control (the helper's ts-017 response) unless told otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from core.net import endpoint
from probes import records as R
from probes.store import connect, write_all
from shared import SHARED

# The shared fingerprint sets; the tests that need no fingerprint still run
# without them (an absent directory is an empty set).
FINGERPRINTS = SHARED / "data" / "fingerprints"
_tx = itertools.count(1)


def page(title: str, size: int = 5000) -> str:
    head = f"<html><head><title>{title}</title></head><body>"
    return head + ("x" * max(0, size - len(head) - 14)) + "</body></html>"


def q(host: str, *ips: str, engine: str = "system", failure: str | None = None, index: int = 0, txid: int | None = None,
      qtype: str = "A", resolver: str = "192.0.2.53:53") -> dict:
    answers = [R.dns_answer("AAAA" if ":" in ip else "A", ip) for ip in ips]
    return R.dns_query(engine=engine, resolver=resolver, hostname=host, query_type=qtype, answers=answers,
                       failure=failure, rcode=None, t0=0.0, t=0.01, transaction_id=txid or next(_tx), response_index=index)


def tcp(ip: str, port: int = 443, failure: str | None = None, attempt: int | None = None) -> dict:
    entry = R.tcp_connect(ip=ip, port=port, failure=failure, t0=0.0, t=0.01, transaction_id=next(_tx))
    if attempt is not None:  # the probe's retries (probes/web_connectivity.py)
        entry["x_attempt"] = attempt
    return entry


def tls(ip: str, host: str, failure: str | None = None, valid: bool | None = None, issuer: str = "CN=Lab CA",
        attempt: int | None = None) -> dict:
    if valid is None:  # the probe only judges a certificate it received
        valid = True if failure is None else (False if failure.startswith("ssl_") else None)
    cert = R.CertInfo(valid=valid, error=failure if not valid else None, issuer=issuer, sha256="ab" * 32) if valid is not None else None
    entry = R.tls_handshake(address=f"{ip}:443", server_name=host, failure=failure, t0=0.0, t=0.02,
                            transaction_id=next(_tx), cert=cert)
    if attempt is not None:
        entry["x_attempt"] = attempt
    return entry


def http(url: str, ip: str | None, *, status: int | None = 200, body: str | None = "", failure: str | None = None,
         index: int = 0, headers: dict | None = None, attempt: int | None = None) -> dict:
    raw = (body or "").encode()
    title = None
    if body and "<title>" in body:
        title = body.split("<title>", 1)[1].split("</title>", 1)[0]
    port = 443 if url.startswith("https") else 80
    response = {} if status is None else {"code": status, "headers": headers or {"Content-Type": "text/html"},
                                          "body": body or "", "body_is_truncated": False}
    entry = {"request": {"url": url, "method": "GET", "headers": {}}, "response": response, "failure": failure,
             "t0": 0.0, "t": 0.1, "transaction_id": next(_tx), "x_redirect_index": index,
             "x_address": f"{ip}:{port}" if ip else None, "x_body_length": len(raw) if status is not None else None,
             "x_body_sha256": hashlib.sha256(raw).hexdigest() if status is not None else None, "x_title": title}
    if attempt is not None:
        entry["x_attempt"] = attempt
    return entry


def control(*, addrs=("198.18.0.10",), dns_failure=None, tcp_ok: dict | None = None, tls_ok: dict | None = None,
            status: int | None = 200, body: str | None = None, title: str | None = None, http_failure=None,
            server: str | None = None, port: int = 443, host: str | None = None) -> dict:
    tcp_map = tcp_ok if tcp_ok is not None else {a: None for a in addrs}
    tls_map = tls_ok if tls_ok is not None else ({a: None for a in addrs} if port == 443 else {})
    raw = (body or "").encode()
    headers = {"Content-Type": "text/html"}
    if server:
        headers["Server"] = server
    return {
        "dns": {"failure": dns_failure, "addrs": list(addrs)},
        "tcp_connect": {endpoint(a, port): {"status": f is None, "failure": f} for a, f in tcp_map.items()},
        "tls_handshake": {endpoint(a, port): {"server_name": host, "status": f is None, "failure": f,
                                          "x_cert_valid": f is None} for a, f in tls_map.items()},
        "http_request": {"failure": http_failure, "status_code": status if http_failure is None else -1,
                         "body_length": len(raw) if http_failure is None else -1, "title": title,
                         "headers": headers, "x_body_sha256": hashlib.sha256(raw).hexdigest() if body is not None else None},
        "ip_info": {},
    }


def web(url: str, *, queries=(), tcps=(), tlss=(), requests=(), ctl: dict | None = None, control_failure=None,
        network_ok: bool | None = True, run_id: str = "run-1", started: float = 1_750_000_000.0,
        cc: str = "ZZ", asn: str = "AS64500") -> dict:
    m = R.Measurement(test_name="web_connectivity", test_version="0.1.0", input=url, run_id=run_id,
                      probe_cc=cc, probe_asn=asn, started=started)
    m.test_keys = {
        "queries": list(queries), "tcp_connect": list(tcps), "tls_handshakes": list(tlss),
        "requests": list(requests), "network_events": [], "control": ctl,
        "control_failure": control_failure if ctl is None else None,
        "x_control_helper": "https://helper.example" if ctl else None, "x_probe_network_ok": network_ok,
    }
    if ctl is None and control_failure is None:
        m.test_keys["control_failure"] = "http_request_failed"
    return m.to_dict()


def one_page(host: str, url: str, ip: str, title: str, size: int, *, echo: str | None = None,
             echo_words: str = "you are", run_id: str, started: float) -> tuple[dict, str]:
    """A web_connectivity record that fetched one page of ``host`` (one DNS
    answer ``ip``, one connect, one request, a control that agrees), and that
    page's body. ``echo``: the page tells the client its address (an
    ``X-Your-Address`` header and ``echo_words`` + the address in the body),
    as a hostile or careless site may (the uploader and the collector must
    scrub it)."""
    headers = {"Content-Type": "text/html"}
    body = page(title, size)
    if echo:
        headers["X-Your-Address"] = echo
        body = body.replace("<body>", f"<body>{echo_words} {echo}")
    record = web(url, queries=[q(host, ip)], tcps=[tcp(ip)], requests=[http(url, ip, body=body, headers=headers)],
                 ctl=control(addrs=(ip,)), run_id=run_id, started=started)
    return record, body


def download(variant: str, attempt: int, kbit: float, ip: str = "198.18.0.10", side: str = "probe") -> dict:
    """One ``x_throughput`` entry of the throttling test (probes/throttling.py,
    probes/timed_download.py): ten 200 ms samples around ``kbit``."""
    samples = [kbit * (1 + 0.01 * k) for k in range(10)]
    return {"side": side, "variant": variant, "attempt": attempt, "ip": ip, "server_name": "x", "failure": None,
            "bytes": int(kbit * 250), "seconds": 2.0, "kbit_per_s": kbit, "x_status_code": 200, "x_stopped": "deadline",
            "x_body_bytes": int(kbit * 240), "x_samples_kbit": samples}


def throttling(url: str, target_kbit: float, scrambled_kbit: float, helper_kbit: float | None = None,
               run_id: str = "run-t", rounds: int = 4) -> dict:
    """A record of the ``throttling`` test as the probe writes it: interleaved
    target and scrambled-SNI downloads, and the helper's own download in its
    control answer (services/helper/throughput.py)."""
    m = R.Measurement(test_name="throttling", test_version="0.1.0", input=url, run_id=run_id)
    entries = [download(v, i, target_kbit if v == "target" else scrambled_kbit)
               for i in range(rounds) for v in ("target", "scrambled")]
    ctl = None
    if helper_kbit is not None:
        ctl = {"dns": {}, "tcp_connect": {}, "http_request": {},
               "x_throughput": [download("helper", 0, helper_kbit) | {"side": "control"}]}
    m.test_keys = {"queries": [], "tcp_connect": [], "tls_handshakes": [], "x_throughput": entries, "control": ctl,
                   "control_failure": None if ctl else "no_helper_configured", "x_control_helper": None,
                   "x_probe_network_ok": True, "x_settings": None}
    return m.to_dict()


def database(records: list[dict], **analyze_kwargs) -> Any:
    """An in-memory database holding ``records``, analysed."""
    from analysis.engine import analyze

    con = connect(":memory:")
    write_all(con, [(r, None) for r in records])
    analyze_kwargs.setdefault("fingerprints_dir", FINGERPRINTS if FINGERPRINTS.is_dir() else "/nonexistent")
    analyze_kwargs.setdefault("public_networks", ["198.18.0.0/15"])
    analyze(con, **analyze_kwargs)
    return con


def row(con, sql: str, params: list | None = None) -> dict | None:
    """One result row as {column: value}."""
    cursor = con.execute(sql, params or [])
    values = cursor.fetchone()
    return None if values is None else dict(zip((d[0] for d in cursor.description), values))


def verdict(con, record: dict) -> dict:
    v = row(con, "SELECT status, layer, method, confidence, confirmed, evidence FROM verdicts WHERE measurement_id = ?",
            [record["measurement_id"]])
    assert v is not None, "no verdict written"
    v["evidence"] = json.loads(v["evidence"])
    return v
