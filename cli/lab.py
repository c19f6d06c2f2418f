"""`vantage lab`: build the censorship lab, run scenarios, open a probe shell."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import click

import lab as lab_package
from lab import plan
from lab.topology import LabError

from .common import cell, safe, to_json

LAB_DIR = Path(lab_package.__file__).parent


def _resolve_scenario(name: str) -> Path:
    """A path, or the name of a scenario shipped with the project."""
    p = Path(name)
    if p.exists():
        return p
    for base in (LAB_DIR / "scenarios", LAB_DIR, Path.cwd() / "lab" / "scenarios"):
        for cand in (base / name, base / f"{name}.toml"):
            if cand.exists():
                return cand
    return p  # load() reports it cannot be read


@click.group("lab")
def lab() -> None:
    """Censorship lab in network namespaces (root only). See docs/lab.md."""


@lab.command("run")
@click.argument("scenario")
@click.option("--json", "as_json", is_flag=True, help="Print the scored result as JSON (LAB.md).")
@click.option("--keep", is_flag=True, help="Keep the work directory (logs, database) after teardown.")
def run_cmd(scenario: str, as_json: bool, keep: bool) -> None:
    """Build the lab for SCENARIO, run the probe, analyze and score the verdicts."""
    from lab.runner import run_scenario

    progress = None if as_json else (lambda m: click.echo(f"· {m}", err=True))
    try:
        result = run_scenario(_resolve_scenario(scenario), progress, keep=keep)
    except KeyboardInterrupt:
        raise LabError("interrupted (the lab was torn down)") from None
    if as_json:
        click.echo(to_json(result))
    else:
        _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    table = Table(title=cell(f"scenario {result['scenario']}: {result['correct']}/{result['total']} correct in {result['seconds']}s"))
    for col in ("", "url", "expected", "got", "conf."):
        table.add_column(col, overflow="fold")
    fmt = lambda d: " / ".join(str(d.get(k)) for k in ("status", "layer", "method") if d and d.get(k)) if d else "(no verdict)"  # noqa: E731
    for r in result["results"]:
        got = r["got"] or {}
        conf = got.get("confidence")
        table.add_row(cell("✓", "green") if r["correct"] else cell("✗", "red"), cell(r["url"]), cell(fmt(r["expected"])),
                      cell(fmt(r["got"])), "" if conf is None else f"{conf:.2f}")
    console.print(table)
    for e in result.get("errors", []):
        console.print(Text.assemble(("note:", "yellow"), " ", safe(e)), highlight=False)


@lab.command("up")
@click.argument("scenario")
@click.option("--no-censor", is_flag=True, help="Build the lab without the on-path censor.")
def up_cmd(scenario: str, no_censor: bool) -> None:
    """Build the lab for SCENARIO and keep it up until Ctrl-C (use `vantage lab shell` meanwhile)."""
    from lab.runner import ScenarioLab
    from lab.scenario import load

    try:
        sc = load(_resolve_scenario(scenario))
        with ScenarioLab(sc, with_censor=not no_censor) as slab:
            click.echo(f"lab {slab.lab.prefix} is up for scenario '{safe(sc.name)}' (work directory {safe(slab.workdir)})")
            for role in plan.ROLES:
                click.echo(f"  {role:9} {slab.ns(role)}")
            for domain, ips in slab.addresses.items():
                extra = f" (control side {', '.join(slab.control_addresses[domain])})" if domain in slab.control_addresses else ""
                click.echo(safe(f"  {domain:28} {', '.join(ips)}{extra}"))
            for note in slab.notes:
                click.echo(f"  note: {safe(note)}")
            click.echo("`vantage lab shell` opens a shell in the probe namespace; Ctrl-C here tears the lab down.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("lab torn down", err=True)


@lab.command("down")
def down_cmd() -> None:
    """Remove every lab, live or left over by a crashed run."""
    from lab.topology import down_all

    removed = down_all()
    click.echo(f"removed {len(removed)} lab(s){': ' + ', '.join(removed) if removed else ''}")


@lab.command("shell")
@click.option("--lab", "prefix", help="Which lab (prefix such as vl1a2b3c); default: the newest.")
@click.option("--role", type=click.Choice(list(plan.ROLES)), default="probe", show_default=True, help="Namespace to enter.")
def shell_cmd(prefix: str | None, role: str) -> None:
    """A shell in the lab's probe namespace, with VANTAGE_* set so `vantage run` uses the lab."""
    from lab.topology import check_prerequisites, live_prefixes, read_state

    check_prerequisites(("ip",))
    states = [s for s in (read_state(p) for p in live_prefixes()) if s and s.get("env")]
    if prefix:
        states = [s for s in states if s["prefix"] == prefix]
    if not states:
        raise LabError("no lab is up: start one with `vantage lab up SCENARIO` in another terminal")
    state = max(states, key=lambda s: s.get("created", 0))
    env = dict(os.environ)
    env.update(state["env"])
    env["PS1"] = f"(lab {state['prefix']} {role}) \\w \\$ "
    shell = os.environ.get("SHELL") or "/bin/bash"
    click.echo(f"entering {role} namespace of lab {state['prefix']} ({state.get('scenario')}); exit to leave", err=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.execvpe("ip", ["ip", "netns", "exec", f"{state['prefix']}-{role}", shell], env)
