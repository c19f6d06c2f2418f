"""The database schema, defined once: ``schema.sql``.

``schema.sql`` is the current schema of a new database, and the one place a
table or column is declared. Everything else derives from it: the writer's
column lists and types (``TABLES``, parsed here), the flattener's row keys
(checked against ``TABLES`` by tests/test_schema.py), and docs/schema.md.

A database made by an older Vantage is brought up to date by ``MIGRATIONS``,
numbered steps recorded in ``schema_migrations``; a new database gets
``schema.sql`` and every version at once. A test replays the migrations from
version 1 and checks the result equals ``schema.sql``. To change the schema:
edit ``schema.sql`` and append a migration doing the same to an existing
database.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from core import schema_version

SCHEMA_SQL = resources.files("probes").joinpath("schema.sql").read_text()

# (version, name, SQL bringing version-1 databases to this version). Version 1
# is schema.sql as first released; it has no step of its own.
MIGRATIONS: list[tuple[int, str, str | None]] = [
    (1, "initial schema", None),
    (2, "runs.rescued: how many records of the run went to its rescue file",
     "ALTER TABLE runs ADD COLUMN IF NOT EXISTS rescued INTEGER DEFAULT 0"),
    (3, "measurements.ooni_blocking, ooni_accessible: OONI's own verdict of an imported measurement",
     "ALTER TABLE measurements ADD COLUMN IF NOT EXISTS ooni_blocking VARCHAR; "
     "ALTER TABLE measurements ADD COLUMN IF NOT EXISTS ooni_accessible BOOLEAN"),
    (4, "attempt of tcp_connects, tls_handshakes, http_transactions (retried steps); ip_info (the helper's ASNs)",
     "ALTER TABLE tcp_connects ADD COLUMN IF NOT EXISTS attempt INTEGER; "
     "ALTER TABLE tls_handshakes ADD COLUMN IF NOT EXISTS attempt INTEGER; "
     "ALTER TABLE http_transactions ADD COLUMN IF NOT EXISTS attempt INTEGER; "
     "CREATE TABLE IF NOT EXISTS ip_info (measurement_id VARCHAR, side VARCHAR, ip VARCHAR, asn INTEGER, flags INTEGER)"),
    (5, "uploads: the measurements a collector acknowledged (vantage upload)",
     "CREATE TABLE IF NOT EXISTS uploads (measurement_id VARCHAR, collector VARCHAR, collector_measurement_id VARCHAR, "
     "report_id VARCHAR, uploaded_at TIMESTAMP)"),
    (6, "packets: IP TTL and IP ID of packets the packet probes and the capture read (injected-packet evidence)",
     "CREATE TABLE IF NOT EXISTS packets (measurement_id VARCHAR, side VARCHAR, transaction_id INTEGER, kind VARCHAR, flow VARCHAR, src VARCHAR, sport INTEGER, dport INTEGER, proto INTEGER, ip_ttl INTEGER, ip_id INTEGER, tcp_flags VARCHAR, length INTEGER, t DOUBLE, baseline_ttl INTEGER, baseline_ip_id INTEGER, injected BOOLEAN)"),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
if SCHEMA_VERSION != schema_version.SCHEMA_VERSION:  # one fact: the migrations end at core's number
    raise RuntimeError(f"probes/schema.py MIGRATIONS end at version {SCHEMA_VERSION}, "
                       f"core/schema_version.py says {schema_version.SCHEMA_VERSION}: change both")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # DuckDB's type name, upper case: VARCHAR, INTEGER, BIGINT, DOUBLE, BOOLEAN, JSON, TIMESTAMP


_TABLE = re.compile(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s*\((.*?)\)\s*;", re.IGNORECASE | re.DOTALL)
_CONSTRAINT = re.compile(r"(PRIMARY\s+KEY|UNIQUE|CHECK|FOREIGN\s+KEY|CONSTRAINT)\b", re.IGNORECASE)


def parse_tables(sql: str) -> dict[str, tuple[Column, ...]]:
    """Tables and their columns, in declaration order, from CREATE TABLE
    statements (one column per line; ``--`` comments allowed)."""
    text = re.sub(r"--[^\n]*", "", sql)
    tables: dict[str, tuple[Column, ...]] = {}
    for name, body in _TABLE.findall(text):
        columns = []
        for line in body.split(","):
            words = line.split()
            if not words or _CONSTRAINT.match(line.strip()):
                continue
            columns.append(Column(words[0], re.sub(r"\(.*", "", words[1]).upper()))
        tables[name] = tuple(columns)
    return tables


TABLES: dict[str, tuple[Column, ...]] = parse_tables(SCHEMA_SQL)
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {name: tuple(c.name for c in cols) for name, cols in TABLES.items()}
