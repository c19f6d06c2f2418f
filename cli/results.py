"""`vantage results list|show`: what has been measured, for humans and scripts.

Every value printed comes from the database, much of it from the network
(titles, headers, URLs, failure strings): it goes through ``common.safe`` /
``common.cell``. Ids are printed whole, on their own line, so they can be
copied at any terminal width.
"""

from __future__ import annotations

import click

from core.errors import VantageError

from .common import cell, console, db_option, json_option, resolve_db, safe, to_json


def _open(db_path):
    from probes import store

    return store.connect(resolve_db(db_path), read_only=True)


def _rows(con, sql, params=()):
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _block(head: list[tuple[object, str]], detail: str):
    """A record for a narrow terminal: the id line (``head``: (text, style)
    pieces, the id first), then an indented detail line that may wrap."""
    from rich.text import Text

    line = Text()
    for i, (value, style) in enumerate(head):
        if i:
            line.append("  ")
        line.append(safe(value), style=style)
    rest = Text("  " + detail, overflow="fold")
    return line, rest


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
        click.echo(to_json(rows))
        return
    out = console()
    out.print(cell("runs, newest first", "bold"))
    if not rows:
        out.print("(none yet: `vantage run` measures and stores a run)")
    for r in rows:
        started = str(r["started_at"] or "")[:19]
        head, rest = _block(
            [(r["run_id"], "bold"), (r["status"], ""), (f"{r['measured']}/{r['inputs_total']} measured", "")],
            f"{safe(r['test_name'])}, started {safe(started)} UTC, {safe(r['probe_cc'])} {safe(r['probe_asn'])}",
        )
        out.print(head)
        out.print(rest)


def _has_table(con, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def _verdict_text(row: dict) -> str:
    if not row.get("status"):
        return "not analysed"
    return " ".join(safe(row[k]) for k in ("status", "layer", "method") if row.get(k))


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
            click.echo(to_json({"run": run[0], "measurements": rows}))
            return
        out = console()
        count = f"{len(rows)} measurement" + ("" if len(rows) == 1 else "s")
        out.print(cell(f"run {safe(ident)} ({safe(run[0]['status'])}): {count}", "bold"))
        for r in rows:
            head, rest = _block([(r["measurement_id"], "bold"), (_verdict_text(r), "")], safe(r["input"]))
            out.print(head)
            out.print(rest)
        return
    found = _rows(con, f"SELECT m.* EXCLUDE (record), {verdict_cols} FROM measurements m {join} WHERE m.measurement_id = ?", [ident])
    if not found:
        raise VantageError(f"no run or measurement with id {safe(ident)}")
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
        click.echo(to_json({"measurement": m, "explanation": explanation, "observations": obs}))
        return
    click.echo(f"measurement {safe(m['measurement_id'])}")
    click.echo(f"  input: {safe(m['input'])}")
    click.echo(f"  run {safe(m['run_id'])}, {safe(m['start_time'])}, {safe(m['probe_cc'])} {safe(m['probe_asn'])}")
    if m.get("status"):
        click.echo(f"verdict: {_verdict_text(m)} (confidence {safe(m.get('confidence'))})")
        if explanation:
            click.echo(safe(explanation))
    else:
        click.echo("verdict: not analysed yet (run `vantage analyze`)")
    if m.get("control_failure"):
        click.echo(f"control: {safe(m['control_failure'])}")
    for table, rows in obs.items():
        click.echo(f"\n{table}:")
        for r in rows:
            click.echo("  " + ", ".join(f"{k}={safe(v)}" for k, v in r.items() if v is not None))


@results.command("import-rescue")
@click.argument("rescue_file", type=click.Path(exists=True, dir_okay=False))
@db_option
@json_option
def import_rescue(rescue_file, db_path, as_json):
    """Store the measurements of a rescue file (written when the database refused
    them); records already stored are skipped, so running it twice is harmless."""
    from probes import store

    con = store.connect(resolve_db(db_path))
    try:
        imported, skipped = store.import_rescue(con, rescue_file)
    finally:
        con.close()
    if as_json:
        click.echo(to_json({"file": rescue_file, "imported": imported, "skipped": skipped}))
        return
    click.echo(f"{imported} measurements stored from {safe(rescue_file)}; {skipped} skipped "
               "(already stored, unreadable, or still refused — the file is left as it is)")
