"""`vantage schedule install|remove|status`: unattended runs (probes/schedule.py)."""

from __future__ import annotations

import click

from .common import json_option, safe, to_json

_scheduler = click.option("--scheduler", type=click.Choice(["auto", "systemd", "cron"]), default="auto", show_default=True,
                          help="systemd timer, or cron where there is no systemd.")
_unit_dir = click.option("--unit-dir", type=click.Path(file_okay=False),
                         help="Write the systemd units here and call no systemctl (tests, packaging).")
_crontab_file = click.option("--crontab-file", type=click.Path(dir_okay=False),
                             help="Edit this file instead of the user's crontab (tests).")
_config = click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (TOML).")


@click.group()
def schedule() -> None:
    """Measure unattended (a Raspberry Pi): a timer runs `vantage run --unattended`."""


@schedule.command()
@click.option("--every", default="6h", show_default=True, help="How often: 10m, 15m, 20m, 30m, 1h, 2h, 3h, 4h, 6h, 8h, 12h or 1d.")
@click.option("--max-runtime", type=click.IntRange(60, 86400), default=1800, show_default=True,
              help="Stop starting measurements after S seconds.")
@click.option("--list", "list_name", default="default", show_default=True, help="Test list to measure.")
@_scheduler
@_unit_dir
@_crontab_file
@_config
@json_option
def install(every, max_runtime, list_name, scheduler, unit_dir, crontab_file, config_path, as_json):
    """Run a bounded measurement every --every (needs consent recorded in the config)."""
    from probes import schedule as sched
    from probes.config import load_config

    config = load_config(config_path)
    plan = sched.plan(every, max_runtime, list_name, config.path)
    done = sched.install(plan, config, scheduler=scheduler, unit_dir=unit_dir, crontab_file=crontab_file)
    if as_json:
        click.echo(to_json(done))
        return
    for warning in done["warnings"]:
        click.echo(f"vantage: warning: {safe(warning)}", err=True)
    where = "journal (`journalctl --user -u vantage-measure`)" if done["scheduler"] == "systemd" else safe(done["log"])
    click.echo(f"installed ({done['scheduler']}): list {safe(list_name)} every {plan.every.text}, at most "
               f"{max_runtime} s a run; output in the {where}")
    if not sched.upload_after_run(config):
        values = config.as_dict()
        why = ("upload_after_run is off" if values.get(sched.UPLOAD_AFTER_RUN) is not True
               else "uploading was not agreed to in the consent notice")
        click.echo(f"measurements stay on this machine ({why})")


@schedule.command()
@_scheduler
@_unit_dir
@_crontab_file
@json_option
def remove(scheduler, unit_dir, crontab_file, as_json):
    """Stop the scheduled runs (measurements and settings stay)."""
    from probes import schedule as sched

    done = sched.remove(scheduler=scheduler, unit_dir=unit_dir, crontab_file=crontab_file)
    if as_json:
        click.echo(to_json(done))
        return
    click.echo("removed: " + ", ".join(safe(r) for r in done["removed"]) if done["removed"] else "no schedule was installed")


@schedule.command()
@_scheduler
@_unit_dir
@_crontab_file
@_config
@json_option
def status(scheduler, unit_dir, crontab_file, config_path, as_json):
    """Whether a schedule is installed, the next run, the last run's result."""
    from probes import schedule as sched
    from probes.config import load_config

    config = load_config(config_path)
    found = sched.status(config, scheduler=scheduler, unit_dir=unit_dir, crontab_file=crontab_file)
    if as_json:
        click.echo(to_json(found))
        return
    if found["installed"]:
        click.echo(f"installed: yes ({found['scheduler']})")
        click.echo(f"runs: {safe(found.get('command') or '?')}")
        click.echo(f"next run: {safe(found['next_run'] or 'unknown')}")
    else:
        click.echo("installed: no (`vantage schedule install` sets it up)")
    if found["running"]:
        click.echo(f"running now: pid {found['running']}")
    last = found["last_run"]
    if last:
        runs = ", ".join(f"{safe(r.get('run_id'))} {safe(r.get('status'))}"
                         + (f" {r['measured']}/{r['total']}" if "measured" in r else "") for r in last.get("runs") or [])
        upload = f"; upload {safe(last['upload'])}" if last.get("upload") else ""
        click.echo(f"last run: {safe(last.get('when'))}: {safe(last.get('result'))}" + (f" ({runs})" if runs else "") + upload)
    else:
        click.echo("last run: none yet")
    if not found["consent_given"]:
        click.echo("consent: not recorded — scheduled runs refuse to measure until you accept the notice")
    click.echo(f"database: {safe(found['database'])}")
