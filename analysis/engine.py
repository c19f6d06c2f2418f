"""Turn observations into verdicts: run the SQL rules of ``analysis/sql`` in DuckDB.

The rules are SQL files applied in name order; each builds temp tables (stages
that later stages read several times, so they are materialised once rather
than re-evaluated as inlined views). Python only does what SQL cannot do well:
parameters (which networks are public, the fingerprint set, the failure
vocabulary), IDNA encoding of the few non-ASCII hosts, and classifying the
(few) addresses that are not plain dotted IPv4.

``analyze`` runs in one transaction: the verdict rows of the measurements it
analyses are replaced (one INSERT OR REPLACE, then the throttling verdicts)
and committed together, so a run that fails anywhere leaves the previous
verdicts in place.
Open the database with ``analysis.db.connect``; ``analyze`` also accepts any
DuckDB connection to a Vantage database (the lab's, the tests').
"""

from __future__ import annotations

import ipaddress
import os
import re
from importlib import resources
from pathlib import Path
from typing import Iterable

import duckdb

from core import failures
from core.net import SPECIAL_V4, Policy

from . import fingerprints as fp
from .db import AnalysisError, ensure_schema  # AnalysisError: raised here, re-exported for callers

RULE_FILES = ("10_scope.sql", "20_dns.sql", "21_dns_signals.sql", "30_transport.sql", "35_packets.sql", "40_http.sql",
              "60_verdicts.sql")
AGGREGATE_FILES = ("90_aggregates.sql",)

_NEVER = "'[^\\s\\S]'"  # a regex that matches nothing, for an empty pattern set
_MATCH = re.compile(r"\{\{MATCH (\w+) IN (\w+)\}\}")


def _sql_text(name: str) -> str:
    return resources.files("analysis").joinpath("sql", name).read_text(encoding="utf-8")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_set(values: Iterable[str]) -> str:
    return "(" + ", ".join(_quote(v) for v in sorted(values)) + ")"


def _ranges(networks: Iterable[ipaddress.IPv4Network]) -> list[tuple[int, int]]:
    return [(int(n.network_address), int(n.broadcast_address)) for n in networks]


def public_policy(public_networks: Iterable[str] = ()) -> Policy:
    """Special-purpose ranges (core.net) minus the networks the caller declares
    public (the lab's 198.18.0.0/15): ``is_bogon`` says whether a DNS answer is
    one no resolver should give for a public name."""
    nets = []
    for text in public_networks or ():
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise AnalysisError(f"not a network in CIDR form: {text!r}") from None
    return Policy(allow=nets)


def _render(sql: str, con: duckdb.DuckDBPyConnection, version: str, full_scope: bool) -> str:
    """Fill the placeholders: the scope filter, fingerprint matchers, the
    failure sets and the fingerprint set's version."""
    # Analysing everything needs no filter; skipping the semi-join on every
    # observation scan saves a fifth of the run on a million measurements.
    sql = sql.replace("{{AND_IN_SCOPE}}", "" if full_scope else "AND measurement_id IN (SELECT measurement_id FROM _a_scope)")
    sql = sql.replace("{{UNROUTABLE}}", _sql_set(failures.UNROUTABLE))

    def matcher(column: str, location: str, false_positive: bool) -> str:
        chunks = fp.combined_regexes(con, location, false_positive)
        if not chunks:
            return f"regexp_matches({column}, {_NEVER})"
        return "(" + " OR ".join(f"regexp_matches({column}, {_quote(c)})" for c in chunks) + ")"

    sql = _MATCH.sub(lambda m: matcher(m.group(1), m.group(2), False), sql)
    if "{{FALSE_POSITIVE}}" in sql:
        sql = sql.replace("{{FALSE_POSITIVE}}", "(" + " OR ".join((
            matcher("body", "body", True), matcher("htext", "header", True), matcher("rtext", "response", True))) + ")")
    return sql.replace("{{FINGERPRINT_SET}}", version.replace("'", ""))


def install_views(con: duckdb.DuckDBPyConnection) -> None:
    """(Re)create the analyst views agg_* over verdicts; idempotent."""
    for name in AGGREGATE_FILES:
        con.execute(_sql_text(name))


def analyze(
    con: duckdb.DuckDBPyConnection,
    *,
    public_networks: Iterable[str] = (),
    fingerprints_dir: str | os.PathLike | None = None,
    only_missing: bool = False,
    asn_db: str | os.PathLike | None = None,
) -> int:
    """Write one verdict per measurement into ``verdicts``; returns how many.

    ``public_networks``: CIDRs that are public despite being special-purpose
    (the lab passes 198.18.0.0/15). ``fingerprints_dir``: where the fingerprint
    files are (default: the cache dir); a missing set is not an error, the
    evidence then says ``"fingerprint_set": "none"``. ``only_missing``: analyse
    only measurements that have no verdict yet. ``asn_db``: an IP-to-ASN
    database in MaxMind format (a ``.mmdb`` file, or a directory holding
    ``asn.mmdb`` as `vantage geo update` installs it): a probe answer in the
    same autonomous system (or organisation) as one the control resolved is
    consistent with it. The helper's ``ip_info`` ASNs count without it.
    """
    policy = public_policy(public_networks)
    fps = fp.load(fingerprints_dir)
    asn_reader = open_asn_db(asn_db)
    # One transaction for the whole run (unless the caller holds one): a
    # failure anywhere rolls back every verdict this run wrote.
    own = _begin(con)
    try:
        count = _analyze(con, policy, fps, public_networks, only_missing, asn_reader)
        if own:
            con.execute("COMMIT")
    except BaseException:
        if own:
            _rollback(con)
        try:
            _drop_temp(con)
        except duckdb.Error:  # keep the error that stopped the run, not this one
            pass
        raise
    _drop_temp(con)
    return count


def _begin(con: duckdb.DuckDBPyConnection) -> bool:
    """Start a transaction; False when the caller already holds one."""
    try:
        con.execute("BEGIN TRANSACTION")
    except duckdb.TransactionException:
        return False
    return True


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:  # the connection itself failed: nothing is committed either way
        pass


def _analyze(con: duckdb.DuckDBPyConnection, policy: Policy, fps, public_networks: Iterable[str],
             only_missing: bool, asn_reader=None) -> int:
    ensure_schema(con)
    fp.install(con, fps)

    # Plain dotted IPv4 (nearly every answer) is classified in SQL against
    # these ranges; every other spelling in Python (_classify_others).
    con.execute("CREATE OR REPLACE TEMP TABLE _a_bogon4 (lo BIGINT, hi BIGINT)")
    con.executemany("INSERT INTO _a_bogon4 VALUES (?, ?)", _ranges(ipaddress.ip_network(n) for n, _why in SPECIAL_V4))
    con.execute("CREATE OR REPLACE TEMP TABLE _a_public4 (lo BIGINT, hi BIGINT)")
    public4 = [n for n in policy.allow if n.version == 4]
    if public4:
        con.executemany("INSERT INTO _a_public4 VALUES (?, ?)", _ranges(public4))

    if only_missing:
        con.execute("CREATE OR REPLACE TEMP TABLE _a_scope AS SELECT measurement_id FROM measurements"
                    " WHERE measurement_id NOT IN (SELECT measurement_id FROM verdicts)")
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE _a_scope AS SELECT measurement_id FROM measurements")

    # DuckDB cannot IDNA-encode; the non-ASCII hosts are few, so Python does it.
    con.execute("CREATE OR REPLACE TEMP TABLE _a_idna (domain VARCHAR, ascii VARCHAR)")
    unicode_domains = con.execute(
        "SELECT DISTINCT domain FROM measurements WHERE domain IS NOT NULL AND NOT regexp_full_match(domain, '[\\x00-\\x7f]*')"
        " AND measurement_id IN (SELECT measurement_id FROM _a_scope)").fetchall()
    pairs = []
    for (domain,) in unicode_domains:
        try:
            pairs.append((domain, domain.rstrip(".").encode("idna").decode("ascii").lower()))
        except UnicodeError:
            continue
    if pairs:
        con.executemany("INSERT INTO _a_idna VALUES (?, ?)", pairs)

    for name in RULE_FILES:
        con.execute(_render(_sql_text(name), con, fps.version, not only_missing))
        if name == "20_dns.sql":
            _classify_others(con, policy)
            _asns(con, asn_reader)
    # INSERT OR REPLACE, not DELETE + INSERT: DuckDB commits a
    # delete-then-reinsert of the same primary keys ~15x slower (5 s vs 0.3 s
    # per 100k verdicts, measured).
    con.execute("INSERT OR REPLACE INTO verdicts (measurement_id, input, status, layer, method, confidence, confirmed, evidence, analysed_at)"
                " SELECT measurement_id, input, status, layer, method, confidence, confirmed, evidence, current_timestamp"
                " FROM _a_verdicts")
    count = con.execute("SELECT count(*) FROM _a_verdicts").fetchone()[0]
    # The throttling test's verdicts need a significance test over its
    # samples (analysis/throttling.py); they replace the SQL rules' verdicts,
    # for the measurements of this run's scope only.
    from .throttling import apply_throttling

    apply_throttling(con, public_networks, scope="_a_scope")
    install_views(con)
    return count


def open_asn_db(path: str | os.PathLike | None):
    """A maxminddb reader for ``path`` (file, or directory with asn.mmdb or
    another ``*asn*.mmdb``); None without a path. A path that is given but
    holds no readable database is an AnalysisError."""
    if not path:
        return None
    target = Path(path)
    if target.is_dir():
        found = [target / "asn.mmdb"] if (target / "asn.mmdb").is_file() else sorted(
            p for p in target.glob("*.mmdb") if "asn" in p.name.lower())
        if not found:
            raise AnalysisError(f"no ASN database (asn.mmdb) in {target} (run `vantage geo update`, or pass a .mmdb file)")
        target = found[0]
    import maxminddb

    try:
        return maxminddb.open_database(str(target))
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise AnalysisError(f"cannot read the ASN database {target}: {exc}") from None


def _asns(con: duckdb.DuckDBPyConnection, reader) -> None:
    """``_a_asn(ip, asn, org)`` for the DNS answers of the scope: the helper's
    ``ip_info`` ASNs, and the ASN database's for every other public address."""
    con.execute("CREATE OR REPLACE TEMP TABLE _a_asn AS"
                " SELECT lower(i.ip) AS ip, any_value(i.asn) AS asn, NULL::VARCHAR AS org FROM ip_info i"
                " JOIN _a_ipclass c ON c.ip = lower(i.ip) WHERE i.asn > 0 AND NOT coalesce(c.bogon, false)"
                " {{AND_IN_SCOPE}} GROUP BY ALL".replace(
                    "{{AND_IN_SCOPE}}", "AND i.measurement_id IN (SELECT measurement_id FROM _a_scope)"))
    if reader is None:
        return
    ips = [ip for (ip,) in con.execute("SELECT ip FROM _a_ipclass WHERE NOT coalesce(bogon, false)"
                                       " AND ip NOT IN (SELECT ip FROM _a_asn)").fetchall()]
    rows = []
    for ip in ips:
        try:
            record = reader.get(ip)
        except ValueError:
            continue
        number = (record or {}).get("autonomous_system_number") if isinstance(record, dict) else None
        if number:
            rows.append((ip, int(number), record.get("autonomous_system_organization") or None))
    if rows:
        con.executemany("INSERT INTO _a_asn VALUES (?, ?, ?)", rows)


def _classify_others(con: duckdb.DuckDBPyConnection, policy: Policy) -> None:
    """Classify the addresses 20_dns left unclassified (IPv6, IPv4-mapped and
    any other spelling) with core.net's table, the declared public networks
    applied. Only the bogons, which are rare, travel back to DuckDB."""
    rows = con.execute("SELECT ip FROM _a_ipclass WHERE bogon IS NULL").fetchall()
    bogons = [ip for (ip,) in rows if policy.is_bogon(ip)]
    con.execute("UPDATE _a_ipclass SET bogon = list_contains(?::VARCHAR[], ip) WHERE bogon IS NULL", [bogons])


def _drop_temp(con: duckdb.DuckDBPyConnection) -> None:
    """Free the stage tables: on a million measurements they hold gigabytes."""
    names = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE temporary AND (table_name LIKE '\\_a\\_%' ESCAPE '\\' OR table_name LIKE 'fp\\_%' ESCAPE '\\')").fetchall()]
    for name in names:
        con.execute(f"DROP TABLE IF EXISTS {name}")
    con.execute("DROP MACRO IF EXISTS _a_endpoint_ip")
    con.execute("DROP MACRO IF EXISTS _a_endpoint")


def summary(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Counts of verdicts by status, layer and method (for the CLI)."""
    rows = con.execute(
        "SELECT status, layer, method, count(*) AS n, count(*) FILTER (WHERE confirmed) AS confirmed"
        " FROM verdicts GROUP BY ALL ORDER BY n DESC, status, layer, method").fetchall()
    return [{"status": s, "layer": l, "method": m, "count": n, "confirmed": c} for s, l, m, n, c in rows]
