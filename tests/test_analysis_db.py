"""analysis.db: the analysis opens existing Vantage databases only, and owns
its verdicts table."""

from __future__ import annotations

import duckdb
import pytest

from analysis import db
from analysis.engine import analyze
from analysis_fixtures import control, q, web
from core.errors import VantageError
from probes.store import connect as store_connect, write_all

IP = "198.18.0.10"


def _probe_db(path):
    con = store_connect(path)
    write_all(con, [(web("https://nx.example/", queries=[q("nx.example", failure="dns_nxdomain_error")],
                         ctl=control(addrs=(IP,))), None)])
    con.close()
    return path


def test_a_missing_database_is_an_error_naming_it_and_creates_nothing(tmp_path):
    target = tmp_path / "typo" / "x.duckdb"
    with pytest.raises(db.AnalysisError) as info:
        db.connect(target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, VantageError)
    assert not (tmp_path / "typo").exists()


def test_the_default_path_comes_from_core_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("VANTAGE_DB", str(tmp_path / "default.duckdb"))
    with pytest.raises(db.AnalysisError, match="default.duckdb"):
        db.connect()
    _probe_db(tmp_path / "default.duckdb")
    db.connect().close()


def test_a_directory_or_a_foreign_file_is_refused(tmp_path):
    with pytest.raises(db.AnalysisError, match="not a database file"):
        db.connect(tmp_path)
    junk = tmp_path / "notes.duckdb"
    junk.write_text("not duckdb")
    with pytest.raises(db.AnalysisError, match="cannot open the database"):
        db.connect(junk)
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()  # a DuckDB file, but not Vantage's
    with pytest.raises(db.AnalysisError, match="not a Vantage database"):
        db.connect(other)
    tables = {r[0] for r in duckdb.connect(str(other)).execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables == set()  # refused without being given a verdicts table


def test_connect_creates_verdicts_and_sets_the_memory_limit(tmp_path, monkeypatch):
    path = _probe_db(tmp_path / "v.duckdb")
    raw = duckdb.connect(str(path))
    assert "verdicts" not in {r[0] for r in raw.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    raw.close()
    monkeypatch.setenv(db.MEMORY_ENV, "300MB")
    con = db.connect(path, threads=1)
    assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
    limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.endswith(("MB", "MiB")) and 250 < float(limit.split()[0]) < 350
    assert analyze(con, fingerprints_dir=tmp_path / "none") == 1
    assert con.execute("SELECT method FROM verdicts").fetchone()[0] == "dns.nxdomain"
    con.close()
    db.connect(path).close()  # idempotent on a database that has the table


def test_a_bad_memory_setting_is_one_line(tmp_path, monkeypatch):
    path = _probe_db(tmp_path / "v.duckdb")
    monkeypatch.setenv(db.MEMORY_ENV, "lots'; DROP TABLE measurements; --")
    with pytest.raises(db.AnalysisError, match=db.MEMORY_ENV):
        db.connect(path)


def test_analyze_creates_verdicts_on_any_connection(tmp_path):
    # The lab and the tests hand analyze() a connection of their own.
    con = duckdb.connect(str(_probe_db(tmp_path / "v.duckdb")))
    assert analyze(con, fingerprints_dir=tmp_path / "none") == 1
    assert con.execute("SELECT count(*) FROM verdicts").fetchone()[0] == 1


def test_a_schema_5_database_is_one_line_about_an_older_vantage(tmp_path):
    """A database an older Vantage made (schema version 5: no packets table)
    is refused in one line before any rule runs, whether it records its
    version or not; once the probe's store opened it (migrating), it analyses."""
    from core.schema_version import SCHEMA_VERSION
    from probes import schema

    assert schema.SCHEMA_VERSION == SCHEMA_VERSION == schema.MIGRATIONS[-1][0]
    path = _probe_db(tmp_path / "v5.duckdb")
    raw = duckdb.connect(str(path))
    raw.execute("DROP TABLE packets")
    raw.execute("DELETE FROM schema_migrations WHERE version = 6")
    raw.close()
    with pytest.raises(db.AnalysisError) as info:
        db.connect(path)
    message = str(info.value)
    assert "\n" not in message and "older Vantage" in message and "schema version 5" in message
    assert "vantage results list" in message

    raw = duckdb.connect(str(path))
    raw.execute("DROP TABLE schema_migrations")  # no version recorded: the missing table still says so
    raw.close()
    with pytest.raises(db.AnalysisError) as info:
        db.connect(path)
    assert "\n" not in str(info.value) and "older Vantage" in str(info.value) and "packets" in str(info.value)

    path = _probe_db(tmp_path / "v5b.duckdb")
    raw = duckdb.connect(str(path))
    raw.execute("DROP TABLE packets")
    raw.execute("DELETE FROM schema_migrations WHERE version = 6")
    raw.close()
    store_connect(path).close()  # what `vantage results list` does: migrate
    con = db.connect(path)
    try:
        assert analyze(con, fingerprints_dir=tmp_path / "none") == 1
    finally:
        con.close()
