"""Country reports: `vantage report --country CC --out DIR`.

``build(con, country=..., out_dir=...)`` reads the measurements and verdicts
of one country (optionally a period and some networks), aggregates them in
DuckDB, and writes into ``out_dir``:

- ``index.html``: self-contained (inline CSS and SVG, no script, a
  Content-Security-Policy that forbids loading anything), readable on a phone,
  printable;
- ``report.md``: the same findings as Markdown, for editing;
- ``timeline.svg``, ``methods.svg``, ``throttling.svg``: the charts
  (matplotlib), also inlined in the HTML;
- ``data/*.csv`` and ``data/*.parquet``: the verdict rows and the aggregates
  behind every table and chart, written by DuckDB's COPY.

Nothing measured is ever trusted as markup: the HTML is rendered by Jinja2
with autoescaping, the Markdown with an escaping finalizer, links are made
only for http(s) URLs. The method, its thresholds and the caveats are in the
report itself and in docs/reports.md.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import duckdb

from core.errors import VantageError

from . import changepoints, queries as Q

MIN_ANOMALIES = 3        # unconfirmed blocked/throttled measurements for a finding (else: too little data)
MIN_DAY_SAMPLES = 3      # usable measurements for a (network, day) rate to be charted
MIN_NETWORK_USABLE = 20  # usable measurements for a network to be compared in the method chart
MAX_TIMELINE_NETWORKS = 8
MAX_ROWS = 200           # rows of one table in the HTML/Markdown (all rows are in data/)
_ASN = re.compile(r"(?:AS)?(\d{1,10})", re.IGNORECASE)
_CC = re.compile(r"[A-Za-z]{2}")


class ReportError(VantageError):
    """A report that cannot be made as asked (no such country in the data, no verdicts, bad option)."""


@dataclass
class Report:
    out_dir: Path
    country: str
    measurements: int
    networks: int
    findings: dict[str, int]
    changes: int
    unanalysed: int
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "country": self.country, "measurements": self.measurements,
                "networks": self.networks, "findings": self.findings, "change_points": self.changes,
                "unanalysed": self.unanalysed, "files": self.files}


def normalise_asn(text: str) -> str:
    match = _ASN.fullmatch(text.strip())
    if not match:
        raise ReportError(f"not an ASN: {text!r} (expected AS1234 or 1234)")
    return f"AS{int(match.group(1))}"


def build(con: duckdb.DuckDBPyConnection, *, country: str, out_dir: str | os.PathLike,
          since: dt.date | None = None, until: dt.date | None = None, asns: Sequence[str] = (),
          rule: changepoints.Rule = changepoints.Rule(), generated_at: dt.datetime | None = None) -> Report:
    """Write the report of ``country`` into ``out_dir`` (created if needed).

    Raises ReportError when the scope holds no measurement, or none of them
    has a verdict yet (run `vantage analyze` first)."""
    if not _CC.fullmatch(country or ""):
        raise ReportError(f"not a two-letter country code: {country!r}")
    country = country.upper()
    asns = [normalise_asn(a) for a in asns]
    if since and until and since > until:
        raise ReportError(f"--since {since} is after --until {until}")
    from ..db import ensure_schema

    ensure_schema(con)
    out = Path(out_dir)
    try:
        Q.create_scope(con, country, since, until, asns)
        ov = Q.overview(con)
        scope = _scope_words(country, since, until, asns)
        if not ov["measurements"]:
            raise ReportError(f"no measurements for {scope} in the database")
        if ov["unanalysed"] == ov["measurements"]:
            raise ReportError(f"none of the {ov['measurements']} measurements for {scope} has a verdict:"
                              " run `vantage analyze` first")
        Q.create_findings(con, MIN_ANOMALIES)
        changepoints.compute(con, rule)
        (out / "data").mkdir(parents=True, exist_ok=True)
        context = _context(con, ov, country=country, since=since, until=until, asns=asns, rule=rule,
                           generated_at=generated_at or dt.datetime.now(dt.timezone.utc).replace(microsecond=0))
        files = _export(con, out / "data")
        from . import render

        files += render.write(out, context)
        return Report(out_dir=out, country=country, measurements=ov["measurements"], networks=ov["networks"],
                      findings={k: context["findings"][k]["total"] for k in ("confirmed", "anomaly", "weak")},
                      changes=context["changes_total"], unanalysed=ov["unanalysed"], files=sorted(files))
    finally:
        Q.drop_stages(con)


def _scope_words(country: str, since, until, asns) -> str:
    words = country
    if asns:
        words += " on " + ", ".join(asns)
    if since or until:
        words += f" from {since or 'the start'} to {until or 'the end'}"
    return words


# One line of plain words per method: what the probe saw, against what.
METHOD_WORDS = {
    "dns.nxdomain": "the network's DNS said the site does not exist, while an uncensored control resolved it",
    "dns.bogon": "the network's DNS answered with a private or reserved address instead of the site's",
    "dns.injected": "forged DNS answers were injected on the path",
    "dns.inconsistent": "the network's DNS gave addresses that nothing else vouched for, and those did not lead to the site",
    "dns.timeout": "DNS lookups of the site got no answer, while the control resolved it",
    "tcp.reset": "connections to the site's server were refused, while the control connected",
    "tcp.timeout": "connections to the site's server timed out, while the control connected",
    "tls.reset": "the encrypted connection was cut during the handshake, while the control's worked",
    "tls.timeout": "the encrypted connection stalled during the handshake, while the control's worked",
    "tls.mitm": "an invalid certificate was presented for the site (interception), while the control saw a valid one",
    "http.reset": "the web request was cut after connecting, while the control fetched the page",
    "http.timeout": "the web request stalled after connecting, while the control fetched the page",
    "http.blockpage": "a known blockpage was served instead of the site",
    "http.diff": "a different page was served than the one the control fetched",
    "throttle.sni": "downloads naming this site were much slower than the same download under another name",
    "throttle.ip": "downloads from this site's server were much slower than from the control",
}


def explain(f: dict[str, Any]) -> str:
    words = METHOD_WORDS.get(f["method"], f"the verdict was {f['status']} ({f['method']})")
    period = f"on {f['first_day']}" if f["first_day"] == f["last_day"] else f"between {f['first_day']} and {f['last_day']}"
    text = (f"{f['n']} of {f['usable']} usable measurements of this URL on {f['asn']} {period} "
            f"({(f['share'] or 0):.0%}): {words}")
    if f["confirmed"]:
        text += "; a known censorship fingerprint matched, so this is confirmed"
    return text + "."


def _context(con, ov: dict[str, Any], *, country, since, until, asns, rule, generated_at) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        vantage_version = version("vantage")
    except PackageNotFoundError:
        vantage_version = "unknown"
    networks = Q.networks(con)
    for n in networks:
        n["sufficient"] = n["usable"] >= MIN_NETWORK_USABLE
    shares = {s: (ov[s] / ov["measurements"]) for s in Q.STATUSES}

    findings = {}
    for key, where in (("confirmed", "confirmed"), ("anomaly", "NOT confirmed AND supported"),
                       ("weak", "NOT confirmed AND NOT supported")):
        found, total = Q.findings(con, where, MAX_ROWS)
        for f in found:
            f["explanation"] = explain(f)
        findings[key] = {"rows": found, "total": total}

    # Methods: a pivot of (network, family) for the table and the chart.
    method_rows = Q.methods(con)
    by_net = {n["asn"]: n for n in networks}
    pivot = {}
    for r in method_rows:
        p = pivot.setdefault(r["asn"], {"asn": r["asn"], "usable": by_net[r["asn"]]["usable"],
                                        "sufficient": by_net[r["asn"]]["sufficient"], **{f: 0 for f in Q.FAMILIES}})
        if r["family"] in Q.FAMILIES:
            p[r["family"]] += r["measurements"]
    method_table = [pivot[n["asn"]] for n in networks if n["asn"] in pivot]
    method_names = sorted({(r["family"], r["method"]) for r in method_rows})
    method_detail = {}
    for r in method_rows:
        method_detail.setdefault(r["method"], {"family": r["family"], "method": r["method"], "by": {}})["by"][r["asn"]] = r

    timeline = Q.timeline(con, MIN_DAY_SAMPLES)
    changes, changes_total = changepoints.changes(con, MAX_ROWS)
    states, states_total = changepoints.current_states(con, MAX_ROWS)
    throttled = Q.throttling(con)

    from . import charts

    charted_networks = [n["asn"] for n in networks if n["sufficient"]][:MAX_TIMELINE_NETWORKS]
    charted_days = sum(1 for p in timeline if p["charted"] and p["asn"] in charted_networks)
    chart: dict[str, str | None] = {"timeline": None, "methods": None, "throttling": None}
    if charted_networks and charted_days:
        chart["timeline"] = charts.timeline(timeline, changes, charted_networks)
    compared = [p for p in method_table if p["sufficient"]]
    if compared:
        chart["methods"] = charts.methods(compared)
    throttle_charted = [t for t in throttled if t["supported"] and t["target_kbit"] is not None][:30]
    if throttle_charted:
        chart["throttling"] = charts.throttling(throttle_charted)

    caveats = _caveats(ov, shares, networks, findings, throttled, rule)
    return {
        "country": country, "since": since, "until": until, "asns": asns, "generated_at": generated_at,
        "version": vantage_version, "ov": ov, "shares": shares, "networks": networks,
        "sources": Q.sources(con), "fingerprint_sets": Q.fingerprint_sets(con),
        "findings": findings, "categories": Q.categories(con),
        "method_table": method_table, "method_detail": sorted(method_detail.values(), key=lambda d: (Q.FAMILIES.index(d["family"]) if d["family"] in Q.FAMILIES else 99, d["method"])),
        "method_networks": [n["asn"] for n in networks if n["asn"] in pivot], "families": Q.FAMILIES,
        "method_names": method_names,
        "timeline_networks": charted_networks, "timeline_days": charted_days,
        "changes": changes, "changes_total": changes_total, "states": states, "states_total": states_total,
        "throttling": throttled, "throttle_charted": throttle_charted,
        "charts": chart, "caveats": caveats, "rule": rule, "rule_text": rule.describe(),
        "thresholds": {"min_anomalies": MIN_ANOMALIES, "min_day_samples": MIN_DAY_SAMPLES,
                       "min_network_usable": MIN_NETWORK_USABLE, "max_rows": MAX_ROWS,
                       "max_timeline_networks": MAX_TIMELINE_NETWORKS},
        "insufficient_networks": [n for n in networks if not n["sufficient"]],
    }


def _caveats(ov, shares, networks, findings, throttled, rule) -> list[str]:
    out = [f"{ov['measurements']:,} measurements of {ov['urls']:,} URLs from {ov['vantage_points']:,} vantage points "
           f"(distinct probe runs) on {ov['networks']} networks; {ov['usable']:,} said something about reachability."]
    if ov["unanalysed"]:
        out.append(f"{ov['unanalysed']:,} measurements ({shares['unanalysed']:.1%}) have no verdict yet and count in no "
                   "rate: run `vantage analyze` and make the report again.")
    out.append(f"{shares['inconclusive']:.1%} of the measurements were inconclusive and {shares['down']:.1%} found the "
               "site down for the control too; neither counts as blocked or as reachable.")
    if ov["server_side"]:
        out.append(f"{shares['server_side']:.1%} were refused by the site itself (geo-blocking, challenge pages): "
                   "counted as reachable-but-refused, not as censorship.")
    single = [n["asn"] for n in networks if n["vantage_points"] == 1]
    if single:
        out.append(f"{len(single)} network(s) have a single vantage point ({', '.join(single[:10])}"
                   f"{'…' if len(single) > 10 else ''}): what is seen there may be that vantage point's local "
                   "filter (a school, an office) rather than the network's.")
    thin = [n["asn"] for n in networks if not n["sufficient"]]
    if thin:
        out.append(f"{len(thin)} network(s) have fewer than {MIN_NETWORK_USABLE} usable measurements and are left out "
                   f"of the comparisons and charts: {', '.join(thin[:10])}{'…' if len(thin) > 10 else ''}.")
    if findings["weak"]["total"]:
        out.append(f"{findings['weak']['total']} signal(s) rest on fewer than {MIN_ANOMALIES} anomalous measurements "
                   "without a fingerprint match: they are listed as too little data, not as findings.")
    missing = [t for t in throttled if not t["with_samples"]]
    if missing:
        out.append(f"{len(missing)} throttling finding(s) have no timed downloads stored, so no slowdown can be given.")
    out.append("Vantage points are counted as distinct probe runs (OONI: report ids): one volunteer measuring on two "
               "days counts twice, and the probe's address is never stored, so runs cannot be tied to people.")
    return out


EXPORTS = {
    "verdicts": "SELECT measurement_id, start_time, day, asn, run_id, software, test_name, input, domain, category_code,"
                " status, layer, method, confirmed, confidence, rule, fingerprint, fingerprint_set FROM _r_m"
                " ORDER BY start_time, measurement_id",
    "networks": None,  # filled below from queries
    "timeline": Q.TIMELINE_SQL.replace("$min_day", str(MIN_DAY_SAMPLES)),
    "methods": Q.METHODS_SQL,
    "categories": Q.CATEGORIES_SQL,
    "findings": f"SELECT {Q.FINDING_COLUMNS} FROM _r_findings ORDER BY finding_id",
    "finding_measurements": "SELECT f.finding_id, m.measurement_id, m.start_time, m.run_id, m.status, m.method,"
                            " m.confirmed, m.confidence, m.rule FROM _r_findings f JOIN _r_m m ON m.asn = f.asn"
                            " AND m.input = f.input AND m.status = f.status AND coalesce(m.method, m.status) = f.method"
                            " AND m.confirmed = f.confirmed ORDER BY f.finding_id, m.start_time, m.measurement_id",
    "site_days": "SELECT * FROM _r_site_day ORDER BY asn, input, day",
    "changepoints": "SELECT * FROM _r_changes ORDER BY day, asn, input",
    "throttling": Q.THROTTLING_SQL,
}


def _networks_sql() -> str:
    counts = ", ".join(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in Q.STATUSES)
    return (f"SELECT asn, count(*) AS measurements, count(DISTINCT run_id) AS vantage_points, count(DISTINCT input) AS urls,"
            f" count(*) FILTER (WHERE status IN {Q.USABLE_SQL}) AS usable, {counts} FROM _r_m GROUP BY asn ORDER BY asn")


EXPORTS["networks"] = _networks_sql()


def _export(con, data: Path) -> list[str]:
    """Every table behind the report as CSV and Parquet, written by DuckDB."""
    written = []
    for name, sql in EXPORTS.items():
        for fmt, options in (("csv", "FORMAT csv, HEADER"), ("parquet", "FORMAT parquet, COMPRESSION zstd")):
            path = data / f"{name}.{fmt}"
            con.execute(f"COPY ({sql}) TO '{str(path).replace(chr(39), chr(39) * 2)}' ({options})")
            written.append(f"data/{name}.{fmt}")
    return written
