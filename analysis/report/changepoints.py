"""When did blocking of a site start or stop? A two-state run-length rule.

Method (stated in every report with its parameters):

1. For each (network, URL) with at least one blocked or throttled
   measurement, take the days on which it had at least ``min_day_samples``
   usable measurements (ok, blocked, throttled, server_side). Days without
   enough data are skipped, not guessed.
2. Each such day is in the state *blocked* when the blocked-or-throttled
   share of that day's usable measurements is at least ``threshold``,
   otherwise *reachable*.
3. Consecutive measured days in the same state form a run. Runs shorter than
   ``min_run`` measured days are noise and are dropped.
4. A change point is the first day of a kept run whose state differs from
   the previous kept run: blocking *started* (reachable -> blocked) or
   *stopped* (blocked -> reachable). The change happened between the last
   day of the previous kept run (``last_before``) and that day.

This is the simplest change-point method that can be checked by hand from
the daily table (data/site_days.csv), which matters more for a published
claim than statistical power. It runs in SQL (window functions), so it costs
the same on a million measurements as on a hundred.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from .queries import ANOMALY_SQL, USABLE_SQL, rows


@dataclass(frozen=True)
class Rule:
    threshold: float = 0.5    # blocked share of a day's usable measurements
    min_day_samples: int = 1  # usable measurements for a day to count
    min_run: int = 3          # measured days a state must hold to count

    def describe(self) -> str:
        return (f"two-state run-length rule: a day is 'blocked' when at least {self.threshold:.0%} of its usable "
                f"measurements (at least {self.min_day_samples} a day) were blocked or throttled; a state must hold "
                f"for at least {self.min_run} measured days in a row; a change point is the first day of a run "
                f"whose state differs from the previous run's")


def compute(con: duckdb.DuckDBPyConnection, rule: Rule) -> None:
    """Build ``_r_site_day`` (the daily series), ``_r_runs`` (kept runs) and
    ``_r_changes`` (the change points) from ``_r_m``."""
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _r_site_day AS
        WITH series AS (SELECT DISTINCT asn, input FROM _r_m WHERE status IN {ANOMALY_SQL})
        SELECT asn, input, day, count(*) AS usable,
               count(*) FILTER (WHERE status IN {ANOMALY_SQL}) AS anomaly,
               round(count(*) FILTER (WHERE status IN {ANOMALY_SQL}) / count(*), 4) AS share,
               count(*) FILTER (WHERE status IN {ANOMALY_SQL}) / count(*) >= {float(rule.threshold)} AS blocked
        FROM _r_m WHERE status IN {USABLE_SQL} AND (asn, input) IN (SELECT asn, input FROM series)
        GROUP BY asn, input, day HAVING count(*) >= {int(rule.min_day_samples)}""")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _r_runs AS
        WITH islands AS (
            SELECT *, row_number() OVER (PARTITION BY asn, input ORDER BY day)
                      - row_number() OVER (PARTITION BY asn, input, blocked ORDER BY day) AS island
            FROM _r_site_day),
        runs AS (
            SELECT asn, input, blocked, min(day) AS first_day, max(day) AS last_day, count(*) AS days,
                   sum(anomaly) AS anomaly, sum(usable) AS usable
            FROM islands GROUP BY asn, input, blocked, island)
        SELECT * FROM runs WHERE days >= {int(rule.min_run)}""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _r_changes AS
        WITH ordered AS (
            SELECT *, lag(blocked) OVER w AS prev_blocked, lag(last_day) OVER w AS last_before,
                      lag(days) OVER w AS days_before
            FROM _r_runs WINDOW w AS (PARTITION BY asn, input ORDER BY first_day))
        SELECT o.asn, o.input, any_value(m.domain) AS domain, any_value(m.category_code) AS category_code,
               o.first_day AS day, CASE WHEN o.blocked THEN 'started' ELSE 'stopped' END AS change,
               o.last_before, o.days_before, o.days AS days_after, o.anomaly, o.usable
        FROM ordered o JOIN _r_m m ON m.asn = o.asn AND m.input = o.input
        WHERE o.prev_blocked IS NOT NULL AND o.prev_blocked <> o.blocked
        GROUP BY ALL""")


def changes(con: duckdb.DuckDBPyConnection, limit: int) -> tuple[list[dict[str, Any]], int]:
    total = con.execute("SELECT count(*) FROM _r_changes").fetchone()[0]
    return rows(con, f"SELECT * FROM _r_changes ORDER BY day, asn, domain, input LIMIT {int(limit)}"), total


def current_states(con: duckdb.DuckDBPyConnection, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The state each (network, URL) series ended in, and since when (its
    last kept run), for series that were blocked at some point."""
    sql = """
        WITH last AS (SELECT asn, input, arg_max(blocked, first_day) AS blocked, max(first_day) AS since,
                             arg_max(last_day, first_day) AS until, count(*) AS runs
                      FROM _r_runs GROUP BY asn, input HAVING bool_or(blocked))
        SELECT l.*, (SELECT any_value(domain) FROM _r_m m WHERE m.asn = l.asn AND m.input = l.input) AS domain
        FROM last l"""
    total = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
    return rows(con, f"{sql} ORDER BY since, asn, input LIMIT {int(limit)}"), total
