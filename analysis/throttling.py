"""Verdicts for `throttling` measurements (method: docs/throttling.md).

Reads ``throughput_samples`` (one row per download) and, for the per-interval
samples and response details that have no column, the stored record of each
measurement. Writes one row per measurement in ``verdicts``.

Statistics, stdlib only:

- effect size: ratio of the median per-download throughput of the target to
  that of the scrambled control (robust to one odd download);
- significance: two-sample Kolmogorov–Smirnov test on the per-interval
  throughput samples of both variants. KS compares whole distributions, needs
  no normality (throughput is skewed and bursty under shaping), and is
  sensitive to the shift a shaper produces. The p-value is exact (lattice path
  count) when n*m is small enough, asymptotic (Kolmogorov distribution with
  Stephens' small-sample correction) otherwise. Tied samples (e.g. several
  empty bins) make the test conservative, never anti-conservative;
- consistency: in how many interleaved rounds the target was slower than the
  scrambled download of the same round.

A verdict is ``throttled`` only on positive evidence; everything that is not
evidence is ``ok`` (so a throttling verdict never masks a blocking verdict of
the web test), except when the test itself could not measure or saw a
slowdown it could not confirm: then ``inconclusive``, with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from core.net import Policy

from .db import ensure_schema

# Decision thresholds (documented in docs/throttling.md).
P_THRESHOLD = 0.01          # KS significance
RATIO_THRESHOLD = 0.5       # target median <= half the scrambled median
CONSISTENCY = 0.75          # share of paired rounds where the target was slower
MIN_DOWNLOADS = 2           # per variant, successful and comparable
EXACT_LIMIT = 250_000       # n*m above which the asymptotic p-value is used


# --- Statistics -------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ks_statistic(a: list[float], b: list[float]) -> float:
    """max |F_a(x) - F_b(x)| over the pooled values, ties handled by stepping
    over every copy of a value before comparing."""
    a, b = sorted(a), sorted(b)
    n, m = len(a), len(b)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        x = min(a[i], b[j])
        while i < n and a[i] == x:
            i += 1
        while j < m and b[j] == x:
            j += 1
        d = max(d, abs(i / n - j / m))
    return d


def _exact_p(d: float, n: int, m: int) -> float:
    """P(D >= d) under H0 for continuous data: 1 - (share of monotone lattice
    paths from (0,0) to (n,m) that stay strictly inside |i/n - j/m| < d).

    Works in integers (|i*m - j*n| < d*n*m) so that the boundary is exact, and
    keeps path *shares* rather than counts (u[i][j] = paths / C(i+j, i)) so
    that nothing overflows: u(i,j) = i/(i+j) u(i-1,j) + j/(i+j) u(i,j-1)."""
    bound = round(d * n * m)
    row = [0.0] * (m + 1)
    row[0] = 1.0
    for j in range(1, m + 1):
        row[j] = row[j - 1] if abs(-j * n) < bound else 0.0
    for i in range(1, n + 1):
        row[0] = row[0] if abs(i * m) < bound else 0.0
        for j in range(1, m + 1):
            if abs(i * m - j * n) >= bound:
                row[j] = 0.0
            else:
                row[j] = (i * row[j] + j * row[j - 1]) / (i + j)
    return min(1.0, max(0.0, 1.0 - row[m]))


def _asymptotic_p(d: float, n: int, m: int) -> float:
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 0.2:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return min(1.0, max(0.0, total))


def ks_2samp(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """(D, two-sided p-value, 'exact' | 'asymptotic')."""
    if not a or not b:
        return 0.0, 1.0, "none"
    d = ks_statistic(a, b)
    n, m = len(a), len(b)
    if n * m <= EXACT_LIMIT:
        return d, _exact_p(d, n, m), "exact"
    return d, _asymptotic_p(d, n, m), "asymptotic"


# --- Inputs ----------------------------------------------------------------------


@dataclass
class Download:
    variant: str                       # target | scrambled | helper
    attempt: int | None = None
    failure: str | None = None
    kbit: float | None = None
    seconds: float | None = None
    bytes: int | None = None
    samples: list[float] = field(default_factory=list)   # per-interval kbit/s
    status: int | None = None          # HTTP status code, when known
    stopped: str | None = None         # eof | complete | deadline | max_bytes
    body_bytes: int | None = None
    content_length: int | None = None
    ip: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.kbit is not None

    @property
    def time_bound(self) -> bool:
        return self.stopped in ("deadline", "max_bytes")


@dataclass
class Verdict:
    status: str
    layer: str | None = None
    method: str | None = None
    confidence: float = 0.5
    evidence: dict[str, Any] = field(default_factory=dict)


def _summary(downloads: list[Download]) -> dict[str, Any]:
    ok = [d for d in downloads if d.ok]
    return {
        "downloads": len(downloads),
        "ok": len(ok),
        "median_kbit": _round(median(d.kbit for d in ok)),
        "samples": sum(len(d.samples) for d in ok),
        "failures": sorted({d.failure for d in downloads if d.failure}),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _comparable(scrambled: Download, targets: list[Download]) -> bool:
    """Did the scrambled download fetch the same thing as the target? Without
    SNI (http) or with a server that picks the site by SNI, the scrambled
    request may get an error page or another site: a small fast page would
    then look like a "fast control" and fake a slowdown."""
    statuses = [t.status for t in targets if t.status is not None]
    if statuses and scrambled.status != max(set(statuses), key=statuses.count):
        return False
    lengths = {t.content_length for t in targets if t.content_length is not None}
    if scrambled.content_length is not None and lengths:
        reference = median(lengths)
        if reference and abs(scrambled.content_length - reference) > 0.1 * reference:
            return False
    if scrambled.time_bound:
        return True
    smallest = min((t.body_bytes for t in targets if t.body_bytes is not None), default=None)
    return smallest is None or (scrambled.body_bytes or 0) >= 0.9 * smallest


def judge(
    downloads: list[Download],
    helper: list[Download],
    *,
    scheme: str = "https",
    baseline_kbit: float | None = None,
    address_public: bool = True,
    control_failure: str | None = None,
    bin_seconds: float = 0.2,
) -> Verdict:
    """The decision for one measurement (pure: unit-tested on synthetic data).

    ``baseline_kbit``: the probe's typical throughput to *other* sites of the
    same run, needed to tell an address-based throttle from a slow access link.
    """
    targets = [d for d in downloads if d.variant == "target"]
    scrambled = [d for d in downloads if d.variant == "scrambled"]
    t_ok = [d for d in targets if d.ok]
    s_all_ok = [d for d in scrambled if d.ok]
    s_ok = [d for d in s_all_ok if _comparable(d, t_ok)] if t_ok else s_all_ok
    h_ok = [d for d in helper if d.ok]
    ev: dict[str, Any] = {
        "target": _summary(targets),
        "scrambled": _summary(scrambled),
        "helper": _summary(helper) if helper else None,
        "control_failure": control_failure,
        "baseline_kbit": _round(baseline_kbit),
        "thresholds": {"p": P_THRESHOLD, "ratio": RATIO_THRESHOLD, "consistency": CONSISTENCY},
    }
    ev["scrambled"]["comparable"] = len(s_ok)
    layer = "tls" if scheme == "https" else "http"

    if not address_public:
        ev["rule"] = "address_not_public"
        ev["reason"] = "the host resolved to a non-public address (DNS tampering?): see the web_connectivity verdict"
        return Verdict("inconclusive", confidence=0.3, evidence=ev)

    if not t_ok and not s_all_ok:
        if h_ok:
            ev["rule"] = "no_probe_download"
            ev["reason"] = ("no download worked from the probe while the control downloaded: blocking, not "
                            "throttling (see the web_connectivity verdict)")
            return Verdict("inconclusive", confidence=0.3, evidence=ev)
        if helper:
            ev["rule"] = "down_everywhere"
            ev["reason"] = "no download worked from the probe nor from the control"
            return Verdict("down", confidence=0.7, evidence=ev)
        ev["rule"] = "no_download_no_control"
        ev["reason"] = "no download worked from the probe and there is no control download to compare"
        return Verdict("inconclusive", confidence=0.2, evidence=ev)

    if not t_ok:
        ev["rule"] = "target_failed"
        ev["reason"] = ("the target downloads failed while the scrambled ones worked: name-based blocking, not "
                        "throttling (see the web_connectivity verdict)")
        return Verdict("inconclusive", confidence=0.3, evidence=ev)

    t_med = median(d.kbit for d in t_ok)
    # A page that arrives whole within one sampling interval leaves nothing to
    # slow down and nothing to measure: no evidence either way.
    if all(not d.time_bound and (d.seconds or 0) < bin_seconds for d in t_ok):
        ev["rule"] = "too_small"
        ev["reason"] = f"the target page arrives in under {bin_seconds} s: too small to measure throughput"
        return Verdict("ok", confidence=0.5, evidence=ev)

    if len(s_ok) >= 1:
        s_med = median(d.kbit for d in s_ok)
        ratio = t_med / s_med if s_med else None
        t_samples = [x for d in t_ok for x in (d.samples or [d.kbit])]
        s_samples = [x for d in s_ok for x in (d.samples or [d.kbit])]
        stat, p, how = ks_2samp(t_samples, s_samples)
        by_round = {d.attempt: d.kbit for d in s_ok}
        pairs = [(d.kbit, by_round[d.attempt]) for d in t_ok if d.attempt in by_round]
        slower = sum(1 for t, s in pairs if t < s)
        ev.update({
            "ratio": _round(ratio), "ks": {"d": _round(stat, 4), "p": float(f"{p:.3g}"), "n": len(t_samples),
                                            "m": len(s_samples), "method": how},
            "rounds_slower": f"{slower}/{len(pairs)}",
        })
        if ratio is not None and ratio <= RATIO_THRESHOLD:
            why = []
            if len(t_ok) < MIN_DOWNLOADS or len(s_ok) < MIN_DOWNLOADS:
                why.append(f"too few downloads ({len(t_ok)} target, {len(s_ok)} scrambled; need {MIN_DOWNLOADS} each)")
            if p >= P_THRESHOLD:
                why.append(f"the distributions are not significantly different (KS p={p:.3g} >= {P_THRESHOLD})")
            if pairs and slower / len(pairs) < CONSISTENCY:
                why.append(f"the target was slower in only {slower} of {len(pairs)} rounds")
            if not why:
                ev["rule"] = "target_slower_than_scrambled"
                ev["reason"] = (f"target median {t_med:.0f} kbit/s is {ratio:.3g}x the scrambled control's "
                                f"{s_med:.0f} kbit/s on the same address (KS p={p:.3g}, slower in {slower}/{len(pairs)} rounds)")
                confidence = 0.95 if (p < 1e-4 and ratio <= 1 / 3) else 0.85
                return Verdict("throttled", layer=layer, method="throttle.sni", confidence=confidence, evidence=ev)
            ev["rule"] = "slower_but_noisy"
            ev["reason"] = (f"the target looks {ratio:.3g}x as fast as the scrambled control, but "
                            + "; ".join(why) + ": the samples are too noisy to conclude")
            return Verdict("inconclusive", confidence=0.4, evidence=ev)
    else:
        ev["scrambled_note"] = ("no comparable scrambled download (the server may refuse unknown SNI or serve "
                                "another page): the name cannot be told from the address")

    # Same address slow for both names: compare with the control vantage, and
    # with the probe's own throughput to other sites (a slow access link is
    # slow for every site and is not throttling).
    probe_med = median(d.kbit for d in t_ok + s_ok)
    h_med = median(d.kbit for d in h_ok) if h_ok else None
    ev["probe_median_kbit"] = _round(probe_med)
    if h_med:
        ev["helper_ratio"] = _round(probe_med / h_med)
    if h_med and probe_med <= RATIO_THRESHOLD * h_med:
        if baseline_kbit and probe_med <= RATIO_THRESHOLD * baseline_kbit:
            ev["rule"] = "address_slower_than_control_and_baseline"
            ev["reason"] = (f"this address gives {probe_med:.0f} kbit/s to the probe whatever the name, the control "
                            f"gets {h_med:.0f} kbit/s, and the probe gets {baseline_kbit:.0f} kbit/s from other sites")
            return Verdict("throttled", layer=None, method="throttle.ip", confidence=0.6, evidence=ev)
        ev["note"] = ("slower from the probe than from the control, but the probe is not faster elsewhere "
                      "(or there is no baseline): the probe's own link may be the bottleneck")
    ev["rule"] = "no_slowdown"
    ev["reason"] = "no evidence of a targeted slowdown"
    confidence = 0.8 if len(s_ok) >= MIN_DOWNLOADS else 0.5
    return Verdict("ok", confidence=confidence, evidence=ev)


# --- Database --------------------------------------------------------------------


def _is_public(ip: str | None, policy: Policy) -> bool:
    """Not a special-purpose address (core.net's table), unless declared public."""
    return not ip or not policy.is_bogon(ip)


def _details(record_json: str | None) -> tuple[dict[tuple, dict], dict]:
    """Per-download details from the stored record, keyed (side, variant, attempt)."""
    try:
        record = json.loads(record_json) if record_json else {}
    except ValueError:
        record = {}
    keys = record.get("test_keys") or {}
    out: dict[tuple, dict] = {}
    for e in keys.get("x_throughput") or []:
        out[(e.get("side", "probe"), e.get("variant"), e.get("attempt"))] = e
    for e in ((keys.get("control") or {}).get("x_throughput") or []):
        out[("control", e.get("variant", "helper"), e.get("attempt"))] = e
    return out, keys


def _download(row: tuple, detail: dict) -> Download:
    _mid, _side, variant, attempt, ip, _sni, failure, nbytes, seconds, kbit = row
    return Download(
        variant=variant, attempt=attempt, failure=failure, kbit=kbit, seconds=seconds, bytes=nbytes, ip=ip,
        samples=[float(x) for x in detail.get("x_samples_kbit") or detail.get("samples_kbit") or []],
        status=detail.get("x_status_code", detail.get("status_code")), stopped=detail.get("x_stopped"),
        body_bytes=detail.get("x_body_bytes"), content_length=detail.get("x_content_length"),
    )


def apply_throttling(con, public_networks: Iterable[str] = (), scope: str | None = None) -> int:
    """Write (replace) the verdict of every `throttling` measurement; returns how many.

    ``scope``: the name of a table of ``measurement_id`` (the engine's
    ``_a_scope``, e.g. ``--only-missing``): only those get a verdict. The
    per-run baseline still reads every measurement of their runs."""
    from .engine import public_policy

    ensure_schema(con)
    policy = public_policy(public_networks)
    if scope is not None and not scope.isidentifier():
        raise ValueError(f"not a table name: {scope!r}")
    # The measurements to judge, and the others of their runs (the baseline).
    where = "test_name = 'throttling'"
    if scope is not None:
        where += (f" AND (measurement_id IN (SELECT measurement_id FROM {scope}) OR run_id IN ("
                  f"SELECT run_id FROM measurements WHERE test_name = 'throttling' AND run_id IS NOT NULL"
                  f" AND measurement_id IN (SELECT measurement_id FROM {scope})))")
    measurements = con.execute(
        f"SELECT measurement_id, run_id, input, scheme, control_failure, record FROM measurements "
        f"WHERE {where} ORDER BY measurement_id"
    ).fetchall()
    if not measurements:
        return 0
    judged = ({r[0] for r in con.execute(f"SELECT measurement_id FROM {scope}").fetchall()}
              if scope is not None else None)
    rows = con.execute(
        "SELECT s.measurement_id, s.side, s.variant, s.attempt, s.ip, s.server_name, s.failure, s.bytes, s.seconds, "
        f"s.kbit_per_s FROM throughput_samples s JOIN (SELECT measurement_id FROM measurements WHERE {where}) m "
        "USING (measurement_id) ORDER BY s.measurement_id, s.attempt"
    ).fetchall()
    by_mid: dict[str, list[tuple]] = {}
    for row in rows:
        by_mid.setdefault(row[0], []).append(row)

    parsed = {}
    for mid, run_id, url, scheme, control_failure, record in measurements:
        details, keys = _details(record)
        probe: list[Download] = []
        helper: list[Download] = []
        for row in by_mid.get(mid, []):
            d = _download(row, details.get((row[1], row[2], row[3]), {}))
            (helper if row[1] == "control" else probe).append(d)
        ok = [d.kbit for d in probe if d.ok]
        bin_seconds = (keys.get("x_settings") or {}).get("bin_seconds") or 0.2
        parsed[mid] = (run_id, url, scheme, control_failure, probe, helper, median(ok), bin_seconds)

    # The probe's typical throughput in each run: median over measurements.
    per_run: dict[str, list[tuple[str, float]]] = {}
    for mid, (run_id, *_rest, probe_median, _bins) in parsed.items():
        # Without a run id (imported data) measurements of different probes
        # would be pooled into one baseline.
        if probe_median is not None and run_id is not None:
            per_run.setdefault(run_id, []).append((mid, probe_median))

    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    out = []
    for mid, (run_id, url, scheme, control_failure, probe, helper, _m, bin_seconds) in parsed.items():
        if judged is not None and mid not in judged:
            continue
        others = [v for other, v in per_run.get(run_id, []) if other != mid]
        baseline = median(others) if len(others) >= 2 else None
        ip = next((d.ip for d in probe if d.ip), None)
        verdict = judge(
            probe, helper, scheme=scheme or "https", baseline_kbit=baseline,
            address_public=_is_public(ip, policy), control_failure=control_failure, bin_seconds=bin_seconds,
        )
        out.append((mid, url, verdict.status, verdict.layer, verdict.method, round(verdict.confidence, 3), False,
                    json.dumps(verdict.evidence, sort_keys=True), now))

    # No explicit transaction: the engine may already hold one around analyze().
    if not out:
        return 0
    con.execute("CREATE OR REPLACE TEMP TABLE _a_throttling_judged (measurement_id VARCHAR)")
    con.executemany("INSERT INTO _a_throttling_judged VALUES (?)", [(row[0],) for row in out])
    con.execute("DELETE FROM verdicts WHERE measurement_id IN (SELECT measurement_id FROM _a_throttling_judged)")
    con.execute("DROP TABLE _a_throttling_judged")
    con.executemany(
        "INSERT INTO verdicts (measurement_id, input, status, layer, method, confidence, confirmed, evidence, "
        "analysed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", out)
    return len(out)
