"""Blockpage and DNS fingerprints: load, version, hand to DuckDB, update.

Two public sets are understood:

* OONI blocking-fingerprints: ``fingerprints_http.csv`` and
  ``fingerprints_dns.csv`` (columns name, scope, location_found, pattern_type,
  pattern, ...). Scope ``fp`` marks patterns of pages that are *not* blockpages.
* Censored Planet: ``blockpage_signatures.json`` and
  ``false_positive_signatures.json``, JSON lines of ``{"fingerprint", "pattern"}``
  where the pattern is a regular expression over the whole HTTP response.

Every pattern is turned into one RE2 regular expression so matching runs inside
DuckDB (``regexp_matches``) next to the observation rows, not in a Python loop.
The set's version is a short digest of the files' bytes: it goes into every
verdict's evidence so a verdict can be traced to the exact fingerprints used.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import duckdb

from core.download import DownloadFailed, describe, fetch_capped, install_atomically
from core.errors import VantageError
from core.paths import cache_dir

OONI_HTTP = "fingerprints_http.csv"
OONI_DNS = "fingerprints_dns.csv"
CP_BLOCKPAGES = "blockpage_signatures.json"
CP_FALSE_POSITIVES = "false_positive_signatures.json"
FILES = (OONI_HTTP, OONI_DNS, CP_BLOCKPAGES, CP_FALSE_POSITIVES)

# Where `vantage fingerprints update` fetches from; overridable so tests can
# point at a loopback server and mirrors can be used where GitHub is blocked.
OONI_BASE_ENV = "VANTAGE_OONI_FINGERPRINTS_URL"
CP_BASE_ENV = "VANTAGE_CP_FINGERPRINTS_URL"
OONI_BASE_DEFAULT = "https://raw.githubusercontent.com/ooni/blocking-fingerprints/main/"
CP_BASE_DEFAULT = "https://raw.githubusercontent.com/censoredplanet/censoredplanet-analysis/master/pipeline/metadata/data/"
# Each file is well under 1 MB today; a larger answer is not a fingerprint set.
MAX_FILE_BYTES = 16 * 1024 * 1024


class FingerprintError(VantageError):
    """A problem the user can fix (offline, bad file): one line."""


def default_dir() -> Path:
    """$VANTAGE_FINGERPRINTS_DIR, else ``fingerprints`` in Vantage's cache dir."""
    env = os.environ.get("VANTAGE_FINGERPRINTS_DIR")
    return Path(env) if env else cache_dir() / "fingerprints"


class HttpPattern(NamedTuple):
    source: str          # "ooni" | "censoredplanet"
    name: str
    scope: str           # OONI's scope ("fp" = not a blockpage, "vbw" = vague words)
    location: str        # "body" | "header" | "response" (CP: the whole response)
    header: str | None   # the header name for location "header"
    regex: str           # RE2
    false_positive: bool


class DnsPattern(NamedTuple):
    source: str
    name: str
    scope: str
    ip: str              # a full-match answer


@dataclass
class FingerprintSet:
    """Patterns ready for SQL (the temp tables fp_http and fp_dns)."""

    version: str = "none"
    http: list[HttpPattern] = field(default_factory=list)
    dns: list[DnsPattern] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.http and not self.dns


def _find(directory: Path, name: str) -> Path | None:
    # The shared data keeps Censored Planet files in a sub-folder; the cache
    # keeps everything flat. Accept both.
    for candidate in (directory / name, directory / "censoredplanet" / name):
        if candidate.is_file():
            return candidate
    return None


def _regex_for(pattern_type: str, pattern: str) -> str | None:
    if pattern_type == "contains":
        return re.escape(pattern)
    if pattern_type == "prefix":
        return "^" + re.escape(pattern)
    if pattern_type == "full":
        return "^" + re.escape(pattern) + "$"
    if pattern_type in ("regexp", "regex"):
        return pattern
    return None


def _header_regex(header: str, pattern_type: str, pattern: str) -> str:
    """Header patterns run on a text of ``name: value`` lines (lower-case
    names, one header a line), so one scan covers every header fingerprint."""
    line = "(?m)^" + re.escape(header) + ": "
    if pattern_type == "prefix":
        return line + re.escape(pattern)
    if pattern_type == "full":
        return line + re.escape(pattern) + "$"
    if pattern_type == "contains":
        return line + "[^\\n]*" + re.escape(pattern)
    return line + (pattern[1:] if pattern.startswith("^") else "[^\\n]*" + pattern)


def parse_ooni_http(text: str) -> list[HttpPattern]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        location = (row.get("location_found") or "").strip().lower()
        regex = _regex_for((row.get("pattern_type") or "").strip(), row.get("pattern") or "")
        if not regex or not row.get("pattern"):
            continue
        header = location.split(".", 1)[1] if location.startswith("header.") else None
        if location != "body" and header is None:
            continue
        if header:
            regex = _header_regex(header, (row.get("pattern_type") or "").strip(), row["pattern"])
        scope = (row.get("scope") or "").strip()
        rows.append(HttpPattern("ooni", row["name"], scope, "header" if header else "body", header, regex, scope == "fp"))
    return rows


def parse_ooni_dns(text: str) -> list[DnsPattern]:
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        # Every DNS fingerprint of the set is a full match on an answer.
        if (row.get("pattern_type") or "").strip() != "full" or not row.get("pattern"):
            continue
        rows.append(DnsPattern("ooni", row["name"], (row.get("scope") or "").strip(), row["pattern"].strip()))
    return rows


def parse_cp(text: str, false_positive: bool) -> list[HttpPattern]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise FingerprintError(f"Censored Planet signatures: line {number} is not JSON") from None
        if item.get("pattern"):
            rows.append(HttpPattern("censoredplanet", item.get("fingerprint") or f"line{number}",
                                    "fp" if false_positive else "", "response", None, item["pattern"], false_positive))
    return rows


def _parse_all(texts: dict[str, str]) -> FingerprintSet:
    fps = FingerprintSet()
    if OONI_HTTP in texts:
        fps.http += parse_ooni_http(texts[OONI_HTTP])
    if OONI_DNS in texts:
        fps.dns += parse_ooni_dns(texts[OONI_DNS])
    if CP_BLOCKPAGES in texts:
        fps.http += parse_cp(texts[CP_BLOCKPAGES], False)
    if CP_FALSE_POSITIVES in texts:
        fps.http += parse_cp(texts[CP_FALSE_POSITIVES], True)
    digest = hashlib.sha256()
    for name in sorted(texts):
        digest.update(name.encode() + b"\0" + texts[name].encode() + b"\0")
    fps.files = sorted(texts)
    fps.version = ("fp-" + digest.hexdigest()[:12]) if texts else "none"
    return fps


def load(directory: str | os.PathLike | None = None) -> FingerprintSet:
    """Read whatever of the four files the directory holds (none is fine: the
    analysis then runs without fingerprints and says so in the evidence)."""
    base = Path(directory) if directory else default_dir()
    texts = {}
    for name in FILES:
        path = _find(base, name)
        if path:
            # bytes, not read_text: newline translation would change the digest
            texts[name] = path.read_bytes().decode("utf-8")
    return _parse_all(texts)


def install(con: duckdb.DuckDBPyConnection, fps: FingerprintSet) -> dict[str, int]:
    """Create the temp tables ``fp_http`` and ``fp_dns`` the SQL rules match on.

    Patterns RE2 cannot compile (look-arounds, back-references in a few Censored
    Planet signatures) are dropped here, once, instead of failing the analysis.
    """
    con.execute("CREATE OR REPLACE TEMP TABLE fp_http (source VARCHAR, name VARCHAR, scope VARCHAR, location VARCHAR,"
                " header VARCHAR, regex VARCHAR, false_positive BOOLEAN)")
    con.execute("CREATE OR REPLACE TEMP TABLE fp_dns (source VARCHAR, name VARCHAR, scope VARCHAR, ip VARCHAR)")
    # Through Arrow: executemany costs ~1 ms a row, and there are ~3,000.
    for table, rows, names in (("fp_http", fps.http, HttpPattern._fields), ("fp_dns", fps.dns, DnsPattern._fields)):
        if rows:
            import pyarrow as pa  # lazy: the probe's `vantage run` never pays for it

            arrow = pa.table({n: pa.array(list(col)) for n, col in zip(names, zip(*rows))})
            con.register("_fp_batch", arrow)
            con.execute(f"INSERT INTO {table} SELECT * FROM _fp_batch")
            con.unregister("_fp_batch")
    dropped = con.execute("SELECT count(*) FROM fp_http WHERE try(regexp_matches('', regex)) IS NULL").fetchone()[0]
    con.execute("DELETE FROM fp_http WHERE try(regexp_matches('', regex)) IS NULL")
    kept = con.execute("SELECT count(*) FROM fp_http").fetchone()[0]
    return {"http": kept, "dns": len(fps.dns), "dropped": dropped}


# RE2 keeps a DFA within a memory budget: ~250 alternatives of these patterns
# fit (one linear scan per body); ~400 overflow it and RE2 falls back to a
# 100x slower NFA (measured: 0.3 s vs 53 s per 100k bodies).
CHUNK = 200


def combined_regexes(con: duckdb.DuckDBPyConnection, location: str, false_positive: bool) -> list[str]:
    """Alternations of the patterns for a location, in DFA-sized chunks: a body
    is scanned once per chunk, and the per-pattern join only runs on bodies
    that some chunk matched."""
    rows = [r[0] for r in con.execute("SELECT regex FROM fp_http WHERE location = ? AND false_positive = ? ORDER BY name",
                                      [location, false_positive]).fetchall()]
    return ["|".join(f"(?:{r})" for r in rows[i:i + CHUNK]) for i in range(0, len(rows), CHUNK)]


# --- update ---------------------------------------------------------------------


def _sources() -> dict[str, str]:
    ooni = os.environ.get(OONI_BASE_ENV, OONI_BASE_DEFAULT)
    cp = os.environ.get(CP_BASE_ENV, CP_BASE_DEFAULT)
    ooni = ooni if ooni.endswith("/") else ooni + "/"
    cp = cp if cp.endswith("/") else cp + "/"
    return {OONI_HTTP: ooni + OONI_HTTP, OONI_DNS: ooni + OONI_DNS,
            CP_BLOCKPAGES: cp + CP_BLOCKPAGES, CP_FALSE_POSITIVES: cp + CP_FALSE_POSITIVES}


async def _download(urls: dict[str, str], timeout: float) -> dict[str, bytes]:
    import aiohttp

    bodies: dict[str, bytes] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for name, url in urls.items():
            try:
                bodies[name] = await fetch_capped(session, url, MAX_FILE_BYTES)
            except DownloadFailed as exc:
                raise FingerprintError(f"cannot download the fingerprints: {exc}") from None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise FingerprintError(f"cannot download {url}: {describe(exc)} (offline?)") from None
    return bodies


def update(directory: str | os.PathLike | None = None, timeout: float = 60.0) -> FingerprintSet:
    """Download all four files, check they parse, then replace the cached copies.

    Nothing is written until every file arrived and parsed; then
    core.download.install_atomically writes each to a temporary name, fsyncs
    it and renames the set into place, so an interrupted or offline update
    leaves the previous set intact.
    """
    target = Path(directory) if directory else default_dir()
    bodies = asyncio.run(_download(_sources(), timeout))
    texts = {}
    for name, body in bodies.items():
        try:
            texts[name] = body.decode("utf-8")
        except UnicodeDecodeError:
            raise FingerprintError(f"the downloaded {name} is not UTF-8 text; keeping the old set") from None
    fps = _parse_all(texts)
    if not any(r.source == "ooni" for r in fps.http) or not fps.dns:
        raise FingerprintError("the downloaded OONI fingerprint files hold no patterns; keeping the old set")
    try:
        target.mkdir(parents=True, exist_ok=True)
        install_atomically(target, bodies)
    except OSError as exc:
        raise FingerprintError(f"cannot write fingerprints to {target}: {exc.strerror or exc}") from None
    return fps
