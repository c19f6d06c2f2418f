"""The report's SQL: every figure is aggregated in DuckDB; Python only ever
holds the aggregates (a few hundred rows at most), never measurement rows.

Stage tables are temp tables prefixed ``_r_`` (dropped by ``drop_stages``):

- ``_r_m``: the measurements in scope (country, period, networks) with their
  verdict, one row each; ``status`` is ``unanalysed`` where there is none.
- ``_r_findings``: one row per (network, URL, status, method, confirmed).
- ``_r_site_day``, ``_r_runs``, ``_r_changes``: the change-point rule
  (analysis/report/changepoints.py says how it works).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

import duckdb

# A measurement says something about reachability when it is one of these
# (down and inconclusive ones do not): the denominator of every rate, as in
# the agg_* views (docs/schema.md).
USABLE = ("ok", "blocked", "throttled", "server_side")
ANOMALY = ("blocked", "throttled")
STATUSES = ("ok", "blocked", "throttled", "server_side", "down", "inconclusive", "unanalysed")
# Method families compared across networks.
FAMILIES = ("dns", "tcp", "tls", "http", "throttling")


def _in(values: Sequence[str]) -> str:
    return "(" + ", ".join("'" + v + "'" for v in values) + ")"


USABLE_SQL = _in(USABLE)
ANOMALY_SQL = _in(ANOMALY)


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    cursor = con.execute(sql, params or [])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> dict[str, Any]:
    found = rows(con, sql, params)
    return found[0] if found else {}


def create_scope(con: duckdb.DuckDBPyConnection, country: str, since: dt.date | None, until: dt.date | None,
                 asns: Sequence[str]) -> None:
    """``_r_m``: the measurements of ``country`` in [since, until] (whole
    days, UTC), on ``asns`` when given, each with its verdict."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _r_m AS
        SELECT m.measurement_id, coalesce(m.run_id, 'unknown') AS run_id, m.test_name, m.input, m.domain,
               coalesce(nullif(m.category_code, ''), 'unknown') AS category_code,
               m.start_time, CAST(m.start_time AS DATE) AS day,
               coalesce(nullif(m.probe_asn, ''), 'unknown') AS asn,
               coalesce(m.software_name, 'unknown') AS software,
               coalesce(v.status, 'unanalysed') AS status, v.layer, v.method,
               coalesce(v.confirmed, false) AND v.status = 'blocked' AS confirmed, v.confidence,
               v.evidence->>'rule' AS rule,
               CASE WHEN v.status IN {ANOMALY_SQL} THEN v.evidence->'compared'->>'fingerprint' END AS fingerprint,
               CASE WHEN v.status IN {ANOMALY_SQL} THEN v.evidence->'compared'->>'probe_title' END AS evidence_title,
               v.evidence->>'fingerprint_set' AS fingerprint_set
        FROM measurements m LEFT JOIN verdicts v USING (measurement_id)
        WHERE upper(m.probe_cc) = ?
          AND (CAST(? AS DATE) IS NULL OR m.start_time >= CAST(? AS DATE))
          AND (CAST(? AS DATE) IS NULL OR m.start_time < CAST(? AS DATE) + INTERVAL 1 DAY)
          AND (len(?::VARCHAR[]) = 0 OR list_contains(?::VARCHAR[], upper(m.probe_asn)))
    """, [country.upper(), since, since, until, until, list(asns), list(asns)])


def overview(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    counts = ", ".join(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES)
    return one(con, f"""
        SELECT count(*) AS measurements, count(DISTINCT input) AS urls, count(DISTINCT domain) AS domains,
               count(DISTINCT asn) AS networks, count(DISTINCT asn || chr(0) || run_id) AS vantage_points,
               count(DISTINCT day) AS days, min(day) AS first_day, max(day) AS last_day,
               count(*) FILTER (WHERE status IN {USABLE_SQL}) AS usable,
               count(*) FILTER (WHERE status IN {ANOMALY_SQL}) AS anomaly,
               count(*) FILTER (WHERE confirmed) AS confirmed, {counts}
        FROM _r_m""")


def networks(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """One row per network (ASN): sample sizes, vantage points, verdict counts."""
    counts = ", ".join(f"count(*) FILTER (WHERE status = '{s}') AS {s}" for s in STATUSES)
    return rows(con, f"""
        SELECT asn, count(*) AS measurements, count(DISTINCT run_id) AS vantage_points,
               count(DISTINCT input) AS urls, count(DISTINCT day) AS days, min(day) AS first_day, max(day) AS last_day,
               count(*) FILTER (WHERE status IN {USABLE_SQL}) AS usable,
               count(*) FILTER (WHERE status IN {ANOMALY_SQL}) AS anomaly,
               count(*) FILTER (WHERE confirmed) AS confirmed, {counts},
               round(count(*) FILTER (WHERE status IN {ANOMALY_SQL})
                     / nullif(count(*) FILTER (WHERE status IN {USABLE_SQL}), 0), 4) AS anomaly_rate
        FROM _r_m GROUP BY asn ORDER BY measurements DESC, asn""")


def sources(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return rows(con, "SELECT software, test_name, count(*) AS measurements FROM _r_m GROUP BY ALL ORDER BY measurements DESC")


def fingerprint_sets(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [r["fingerprint_set"] for r in rows(con, "SELECT DISTINCT fingerprint_set FROM _r_m WHERE fingerprint_set IS NOT NULL ORDER BY 1")]


TIMELINE_SQL = f"""
    SELECT asn, day, count(*) AS measurements,
           count(*) FILTER (WHERE status IN {USABLE_SQL}) AS usable,
           count(*) FILTER (WHERE status IN {ANOMALY_SQL}) AS anomaly,
           count(*) FILTER (WHERE confirmed) AS confirmed,
           round(count(*) FILTER (WHERE status IN {ANOMALY_SQL})
                 / nullif(count(*) FILTER (WHERE status IN {USABLE_SQL}), 0), 4) AS anomaly_rate,
           count(*) FILTER (WHERE status IN {USABLE_SQL}) >= $min_day AS charted
    FROM _r_m GROUP BY asn, day ORDER BY asn, day"""


def timeline(con: duckdb.DuckDBPyConnection, min_day: int) -> list[dict[str, Any]]:
    """Anomaly rate per (network, day); ``charted`` is false for a day with
    fewer than ``min_day`` usable measurements (too little to plot a rate)."""
    return rows(con, TIMELINE_SQL.replace("$min_day", str(int(min_day))))


def _family_sql() -> str:
    return ("CASE WHEN status = 'throttled' THEN 'throttling' WHEN status = 'blocked' THEN "
            "coalesce(layer, split_part(method, '.', 1), 'unknown') END")


METHODS_SQL = f"""
    SELECT asn, {_family_sql()} AS family, method, count(*) AS measurements,
           count(*) FILTER (WHERE confirmed) AS confirmed, count(DISTINCT input) AS urls
    FROM _r_m WHERE status IN {ANOMALY_SQL} GROUP BY ALL ORDER BY asn, family, method"""


def methods(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Blocked and throttled measurements per (network, method)."""
    return rows(con, METHODS_SQL)


def create_findings(con: duckdb.DuckDBPyConnection, min_anomalies: int) -> None:
    """``_r_findings``: one row per (network, URL, status, method, confirmed)
    with its counts, the usable measurements of that URL on that network,
    the first and last day, the latest measurement and up to 10 ids."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _r_findings AS
        WITH f AS (
            SELECT asn, input, status, coalesce(method, status) AS method, confirmed,
                   any_value(domain) AS domain, any_value(category_code) AS category_code, any_value(layer) AS layer,
                   count(*) AS n, min(day) AS first_day, max(day) AS last_day,
                   arg_max(measurement_id, start_time) AS latest_id,
                   list(measurement_id ORDER BY start_time DESC, measurement_id)[1:10] AS sample_ids,
                   any_value(fingerprint) FILTER (WHERE fingerprint IS NOT NULL) AS fingerprint,
                   any_value(evidence_title) FILTER (WHERE evidence_title IS NOT NULL) AS evidence_title,
                   round(avg(confidence), 2) AS confidence, count(DISTINCT run_id) AS vantage_points
            FROM _r_m WHERE status IN {ANOMALY_SQL}
            GROUP BY asn, input, status, coalesce(method, status), confirmed),
        p AS (
            SELECT asn, input, count(*) FILTER (WHERE status IN {USABLE_SQL}) AS usable, count(*) AS measured
            FROM _r_m WHERE (asn, input) IN (SELECT asn, input FROM f) GROUP BY asn, input)
        SELECT 'F' || lpad(CAST(row_number() OVER (ORDER BY f.confirmed DESC, f.status, f.category_code, f.domain,
                                                    f.input, f.asn, f.method) AS VARCHAR), 5, '0') AS finding_id,
               f.*, p.usable, p.measured, round(f.n / nullif(p.usable, 0), 4) AS share,
               f.confirmed OR f.n >= {int(min_anomalies)} AS supported
        FROM f JOIN p USING (asn, input)""")


FINDING_COLUMNS = ("finding_id, asn, category_code, domain, input, status, method, layer, confirmed, n, usable, measured, "
                   "share, first_day, last_day, vantage_points, confidence, fingerprint, evidence_title, latest_id, supported")


def findings(con: duckdb.DuckDBPyConnection, where: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` findings matching ``where`` (SQL over _r_findings),
    with the latest measurement's last probe HTTP hop (title, Server), and how
    many matched in all."""
    total = con.execute(f"SELECT count(*) FROM _r_findings WHERE {where}").fetchone()[0]
    found = rows(con, f"""
        WITH f AS (SELECT {FINDING_COLUMNS}, sample_ids FROM _r_findings WHERE {where}
                   ORDER BY category_code, domain, input, asn, method LIMIT {int(limit)}),
        hop AS (
            SELECT measurement_id, arg_max(title, redirect_index) AS http_title,
                   arg_max(coalesce(headers->>'Server', headers->>'server'), redirect_index) AS http_server
            FROM http_transactions WHERE side = 'probe' AND measurement_id IN (SELECT latest_id FROM f)
            GROUP BY measurement_id)
        SELECT f.*, hop.http_title, hop.http_server FROM f LEFT JOIN hop ON hop.measurement_id = f.latest_id
        ORDER BY f.category_code, f.domain, f.input, f.asn, f.method""")
    return found, total


CATEGORIES_SQL = f"""
    WITH c AS (SELECT category_code, count(*) AS measurements, count(DISTINCT input) AS urls,
                      count(*) FILTER (WHERE status IN {USABLE_SQL}) AS usable,
                      count(*) FILTER (WHERE status IN {ANOMALY_SQL}) AS anomaly,
                      count(*) FILTER (WHERE confirmed) AS confirmed
               FROM _r_m GROUP BY category_code),
    f AS (SELECT category_code,
                 count(DISTINCT input) FILTER (WHERE confirmed) AS urls_confirmed,
                 count(DISTINCT input) FILTER (WHERE NOT confirmed AND supported) AS urls_anomaly
          FROM _r_findings GROUP BY category_code)
    SELECT c.*, coalesce(f.urls_confirmed, 0) AS urls_confirmed, coalesce(f.urls_anomaly, 0) AS urls_anomaly,
           round(c.anomaly / nullif(c.usable, 0), 4) AS anomaly_rate
    FROM c LEFT JOIN f USING (category_code) ORDER BY c.anomaly DESC, c.category_code"""


def categories(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return rows(con, CATEGORIES_SQL)


THROTTLING_SQL = """
    WITH s AS (
        SELECT measurement_id,
               median(kbit_per_s) FILTER (WHERE side = 'probe' AND variant = 'target') AS target_kbit,
               median(kbit_per_s) FILTER (WHERE side = 'probe' AND variant = 'scrambled') AS scrambled_kbit,
               median(kbit_per_s) FILTER (WHERE side = 'control' OR variant = 'helper') AS control_kbit
        FROM throughput_samples
        WHERE failure IS NULL AND kbit_per_s IS NOT NULL
          AND measurement_id IN (SELECT measurement_id FROM _r_m WHERE status = 'throttled')
        GROUP BY measurement_id),
    m AS (SELECT r.asn, r.input, r.method, s.* FROM _r_m r JOIN s USING (measurement_id) WHERE r.status = 'throttled')
    SELECT f.finding_id, f.asn, f.domain, f.input, f.method, f.n, f.usable, f.supported,
           round(median(m.target_kbit), 1) AS target_kbit, round(median(m.scrambled_kbit), 1) AS scrambled_kbit,
           round(median(m.control_kbit), 1) AS control_kbit,
           round(CASE WHEN f.method = 'throttle.sni' THEN median(m.scrambled_kbit)
                      ELSE coalesce(median(m.control_kbit), median(m.scrambled_kbit)) END
                 / nullif(median(m.target_kbit), 0), 1) AS slowdown,
           count(m.measurement_id) AS with_samples
    FROM _r_findings f LEFT JOIN m ON m.asn = f.asn AND m.input = f.input AND m.method = f.method
    WHERE f.status = 'throttled'
    GROUP BY f.finding_id, f.asn, f.domain, f.input, f.method, f.n, f.usable, f.supported
    ORDER BY f.domain, f.input, f.asn"""


def throttling(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Throttling findings with the medians of the timed downloads: the
    target's, the scrambled-SNI control's, the helper's, and the slowdown
    (reference median / target median)."""
    return rows(con, THROTTLING_SQL)


def drop_stages(con: duckdb.DuckDBPyConnection) -> None:
    names = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE temporary AND table_name LIKE '\\_r\\_%' ESCAPE '\\'").fetchall()]
    for name in names:
        con.execute(f"DROP TABLE IF EXISTS {name}")
