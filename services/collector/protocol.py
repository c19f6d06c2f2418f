"""bk-003's request and answer shapes, and what the collector checks.

Everything here is pure (no I/O): the app reads the body (bounded), these
functions decide. A refusal is a ``Reject`` carrying the HTTP status and a
reason the client can read (``{"error": reason}``).

- ``decode_body``: ``Content-Encoding`` (identity or gzip, bk-003 1.0: "MUST
  support gzip"; anything else 415), a decompressed-size cap (413), UTF-8
  (400), JSON (400).
- ``check_open``: the open-report body of bk-003 3.1 (required fields, the
  regexes for probe_asn, probe_cc, software_name/version, test_name/version).
- ``check_content``: one measurement's top-level keys per df-000 (types, the
  same regexes, sizes); ``report_id`` inside must match the URL's (3.2.4).
- ``measurement_id``: derived from the content, so a measurement sent twice
  (a retry after a lost answer, the same file re-sent, in another report) is
  one measurement, and no client can claim another's id with other content.
- ``new_report_id``: a capability, 297 random bits from ``secrets``; only
  its SHA-256 is kept (``report_key``) and the stored measurements carry a
  public name derived from it (``public_report_id``), so reading the central
  database does not let anyone append to an open report.
- ``prepare``: the stored form: ``probe_ip`` and any occurrence of it (or of
  the peer's global address) scrubbed, df-000's ``id`` cleared, OONI's
  ``measurement_uid`` set to our id, the report's public name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import secrets
import string
import zlib
from typing import Any

import orjson

BACKEND_VERSION = "vantage-collector-0.1.0"
SUPPORTED_FORMATS = ["json"]

NAME = re.compile(r"^[0-9A-Za-z_.+-]+$")          # software_name, software_version, test_name, test_version
PROBE_CC = re.compile(r"^[A-Z]{2}$")
PROBE_ASN = re.compile(r"^AS[0-9]{1,10}$")
TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$")  # df-000 "2006-01-02 15:04:05"
NAME_MAX = 128       # characters of a name or version
INPUT_MAX = 8192     # characters of an input (a URL)
REPORT_ID_MAX = 256

# Keys the collector sets or clears: not part of what identifies a measurement.
_NOT_IDENTITY = ("report_id", "id", "measurement_uid", "probe_ip", "backend_version", "bucket_date",
                 "report_filename", "run_id")
_ALPHABET = string.ascii_letters + string.digits


class Reject(Exception):
    """A request refused: ``status`` (4xx, or 5xx for our own failures) and a reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


# --- The body ------------------------------------------------------------------


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding``; at most ``limit`` bytes
    once decompressed (a small gzip bomb is refused after ``limit`` bytes of
    output, not after exhausting memory)."""
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip"):
        raise Reject(415, f"Content-Encoding {coding[:40]!r} is not supported (gzip or identity)")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Reject(400, f"the gzip body does not decompress: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise Reject(413, f"the decompressed body is larger than {limit} bytes")
    if not inflater.eof:
        raise Reject(400, "the gzip body is truncated")
    return out


def parse_json(data: bytes) -> Any:
    """JSON from UTF-8 bytes (400 for either failing). orjson checks the
    UTF-8 itself; the bytes are decoded apart only to say why they failed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise Reject(400, f"the body is not UTF-8 (byte {bad.start})") from None
        raise Reject(400, f"the body is not JSON: {str(exc).splitlines()[0][:160]}") from None


def decode_body(body: bytes, encoding: str | None, limit: int) -> Any:
    return parse_json(decompress(body, encoding, limit))


# --- Opening a report ------------------------------------------------------------


def _name(doc: dict[str, Any], key: str, pattern: re.Pattern = NAME, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise Reject(400, f"{key} must be a string" if key in doc else f"{key} is missing")
    if len(value) > NAME_MAX or not pattern.match(value):
        raise Reject(400, f"{key} {value[:40]!r} does not match {pattern.pattern}")
    return value


def check_open(doc: Any) -> dict[str, str]:
    """The fields of an open-report request we keep (bk-003 3.1), or Reject."""
    if not isinstance(doc, dict):
        raise Reject(400, "the body must be a JSON object")
    fmt = doc.get("format")
    if fmt != "json":
        raise Reject(400, "format must be \"json\" (YAML is not supported)" if fmt == "yaml" else "format must be \"json\"")
    if doc.get("content") is not None:
        raise Reject(400, "content in the open request (deprecated) is not supported: submit measurements instead")
    if doc.get("test_helper") is not None:
        raise Reject(400, "test_helper (deprecated) is not supported")
    if not isinstance(doc.get("data_format_version"), str):
        raise Reject(400, "data_format_version must be a string")
    fields = {key: _name(doc, key) for key in ("software_name", "software_version", "test_name", "test_version")}
    fields["probe_cc"] = _name(doc, "probe_cc", PROBE_CC)
    fields["probe_asn"] = _name(doc, "probe_asn", PROBE_ASN)
    return fields


def new_report_id(probe_asn: str, now: dt.datetime | None = None) -> str:
    """OONI's shape, ``20190313T131942Z_AS30722_<50 letters and digits>``:
    the random part alone is log2(62) * 50 = 297 bits from a CSPRNG."""
    now = now or dt.datetime.now(dt.timezone.utc)
    token = "".join(secrets.choice(_ALPHABET) for _ in range(50))
    return f"{now:%Y%m%dT%H%M%SZ}_{probe_asn}_{token}"


def report_key(report_id: str) -> str:
    """What the collector keeps of a capability: its SHA-256 (hex)."""
    return hashlib.sha256(report_id.encode("utf-8", "surrogateescape")).hexdigest()


def public_report_id(report_id: str) -> str:
    """The report's name in the central database: the capability's prefix
    (time, ASN) and a hash in place of its secret."""
    prefix = report_id.rsplit("_", 1)[0] if report_id.count("_") >= 2 else "report"
    return f"{prefix}_{report_key(report_id)[:40]}"


# --- One measurement ----------------------------------------------------------------


def check_content(content: Any, report_id: str | None) -> dict[str, Any]:
    """A measurement's top-level keys per df-000, or Reject (400). With
    ``report_id`` (a report's URL), the content's own ``report_id``, when
    present, must be the same (bk-003 3.2.4)."""
    if not isinstance(content, dict):
        raise Reject(400, "content must be a JSON object (a measurement)")
    _name(content, "test_name")
    _name(content, "software_name")
    _name(content, "software_version")
    _name(content, "test_version", required=False)
    _name(content, "probe_cc", PROBE_CC)
    _name(content, "probe_asn", PROBE_ASN)
    start = content.get("measurement_start_time")
    if not isinstance(start, str) or not TIME.match(start):
        raise Reject(400, "measurement_start_time must be a UTC time like \"2006-01-02 15:04:05\"")
    test_start = content.get("test_start_time")
    if test_start is not None and (not isinstance(test_start, str) or not TIME.match(test_start)):
        raise Reject(400, "test_start_time must be a UTC time like \"2006-01-02 15:04:05\"")
    if not isinstance(content.get("test_keys"), dict):
        raise Reject(400, "test_keys must be a JSON object")
    value = content.get("input")
    if value is not None and (not isinstance(value, str) or len(value) > INPUT_MAX):
        raise Reject(400, f"input must be null or a string of at most {INPUT_MAX} characters")
    for key in ("annotations", "extensions"):
        if content.get(key) is not None and not isinstance(content[key], dict):
            raise Reject(400, f"{key} must be a JSON object")
    helpers = content.get("test_helpers")  # df-000: a map; bk-003's own example sends []
    if helpers is not None and not isinstance(helpers, (dict, list)):
        raise Reject(400, "test_helpers must be a JSON object")
    runtime = content.get("test_runtime")
    if runtime is not None and (isinstance(runtime, bool) or not isinstance(runtime, (int, float))):
        raise Reject(400, "test_runtime must be a number")
    for key in ("data_format_version", "probe_network_name", "resolver_ip", "resolver_asn"):
        if content.get(key) is not None and (not isinstance(content[key], str) or len(content[key]) > NAME_MAX * 4):
            raise Reject(400, f"{key} must be a string")
    inner = content.get("report_id")
    if report_id is not None and inner not in (None, "") and inner != report_id:
        raise Reject(400, "the report_id inside content does not match the report in the URL")
    return content


def measurement_id(content: dict[str, Any]) -> str:
    """Our id for a measurement: a hash of everything the client measured
    (not the keys a collector sets or clears, nor the report it came in).
    The same measurement sent again gets the same id; another content never
    does, so no upload can take another's place."""
    core = dict(content)  # a copy and eight pops: cheaper than a filtering comprehension
    for key in _NOT_IDENTITY:
        core.pop(key, None)
    try:
        blob = orjson.dumps(core, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # integers beyond 64 bits
        raise Reject(400, f"content cannot be stored: {exc}") from None
    return "vc" + hashlib.sha256(blob).hexdigest()[:32]


# What nearly every probe sends as probe_ip (OONI's "not shared") and every
# request through a local proxy comes from: answered without parsing.
_LOCAL = frozenset(("127.0.0.1", "::1", "0.0.0.0", "::", ""))


def _global_ip(value: Any) -> str | None:
    if not isinstance(value, str) or value in _LOCAL:
        return None
    try:
        ip = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    return None if ip.is_loopback or ip.is_unspecified else str(ip)


def scrub_targets(content: dict[str, Any], peer: str | None) -> list[str]:
    """The addresses to remove from a measurement: the probe_ip a client sent
    (not 127.0.0.1, OONI's "not shared") and the peer's address when it is a
    public one (a probe reaching us directly, with no proxy in between)."""
    found = []
    for value in (content.get("probe_ip"), peer):
        ip = _global_ip(value)
        if ip and ip not in found:
            found.append(ip)
    if peer and peer in found:
        try:  # a proxy on loopback or a private network: its address says nothing about the probe
            if not ipaddress.ip_address(peer).is_global:
                found = [ip for ip in found if ip != peer]
        except ValueError:
            pass
    return found


def prepare(content: dict[str, Any], mid: str, public_id: str, peer: str | None, scrub) -> dict[str, Any]:
    """The measurement as stored. ``scrub``: ``probes.runner.scrub`` (every
    string, base64 bodies included); it runs only when there is an address
    to remove (most probes send 127.0.0.1: nothing to do)."""
    ips = scrub_targets(content, peer)
    out = dict(content)
    out["probe_ip"] = "127.0.0.1"
    out.pop("id", None)  # df-000: collectors SHOULD clear it
    if ips:
        out = scrub(out, ips)
    out["report_id"] = public_id
    out["run_id"] = public_id
    out["measurement_uid"] = mid
    out["backend_version"] = BACKEND_VERSION
    return out
