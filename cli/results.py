"""`vantage results list|show`: what has been measured, for humans and scripts."""

from __future__ import annotations

import json

import click

from core.errors import VantageError

from .common import db_option, json_option, resolve_db


def _open(db_path):
    from probes import store

    return store.connect(resolve_db(db_path), read_only=True)


def _rows(con, sql, params=()):
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


@click.group()
def results() -> None:
    """Browse stored runs and measurements."""


@results.command("list")
@db_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1), help="Newest runs to show.")
@json_option
def list_runs(db_path, limit, as_json):
    """List runs, newest first."""
    con = _open(db_path)
    rows = _rows(con, """
        SELECT r.run_id, r.test_name, r.status, CAST(r.started_at AS VARCHAR) AS started_at, r.inputs_total,
               count(m.measurement_id) AS measured, r.probe_cc, r.probe_asn
        FROM runs r LEFT JOIN measurements m USING (run_id)
        GROUP BY r.run_id, r.test_name, r.status, r.started_at, r.inputs_total, r.probe_cc, r.probe_asn
        ORDER BY r.started_at DESC LIMIT ?""", [limit])
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="runs")
    for col in ("run_id", "test_name", "status", "started_at", "measured", "inputs_total", "probe_cc", "probe_asn"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("run_id", "test_name", "status", "started_at", "measured", "inputs_total", "probe_cc", "probe_asn")))
    Console().print(table)


def _has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


@results.command("show")
@click.argument("ident")
@db_option
@json_option
def show(ident, db_path, as_json):
    """Show a run (its measurements) or one measurement (observations and verdict)."""
    con = _open(db_path)
    verdict_cols = "v.status, v.layer, v.method, v.confidence, v.confirmed, v.evidence" if _has_table(con, "verdicts") else "NULL AS status"
    join = "LEFT JOIN verdicts v USING (measurement_id)" if _has_table(con, "verdicts") else ""
    run = _rows(con, "SELECT * FROM runs WHERE run_id = ?", [ident])
    if run:
        rows = _rows(con, f"""SELECT m.measurement_id, m.input, m.control_failure, m.probe_network_ok, {verdict_cols}
                              FROM measurements m {join} WHERE m.run_id = ? ORDER BY m.measurement_id""", [ident])
        if as_json:
            click.echo(json.dumps({"run": run[0], "measurements": rows}, indent=2, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"run {ident} ({run[0]['status']})")
        for col in ("measurement_id", "input", "status", "layer", "method"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["measurement_id"], r["input"], str(r.get("status") or "not analysed"), str(r.get("layer") or ""), str(r.get("method") or ""))
        Console().print(table)
        return
    found = _rows(con, f"SELECT m.* EXCLUDE (record), {verdict_cols} FROM measurements m {join} WHERE m.measurement_id = ?", [ident])
    if not found:
        raise VantageError(f"no run or measurement with id {ident}")
    m = found[0]
    obs = {
        table: _rows(con, f"SELECT * EXCLUDE (measurement_id) FROM {table} WHERE measurement_id = ?", [ident])
        for table in ("dns_answers", "tcp_connects", "tls_handshakes", "http_transactions")
    }
    for row in obs["http_transactions"]:
        row.pop("body", None)
    explanation = None
    if m.get("status"):
        from analysis.explain import describe

        explanation = describe(m)
    if as_json:
        click.echo(json.dumps({"measurement": m, "explanation": explanation, "observations": obs}, indent=2, default=str))
        return
    click.echo(f"{m['input']}  ({m['measurement_id']}, {m['start_time']}, {m['probe_cc']} {m['probe_asn']})")
    if m.get("status"):
        click.echo(f"verdict: {m['status']} {m.get('layer') or ''} {m.get('method') or ''} (confidence {m.get('confidence')})")
        if explanation:
            click.echo(explanation)
    else:
        click.echo("verdict: not analysed yet (run `vantage analyze`)")
    if m.get("control_failure"):
        click.echo(f"control: {m['control_failure']}")
    for table, rows in obs.items():
        click.echo(f"\n{table}:")
        for r in rows:
            click.echo("  " + ", ".join(f"{k}={v}" for k, v in r.items() if v is not None))
