"""Unattended runs: a systemd timer (or a cron line where there is no systemd)
that runs a bounded `vantage run --unattended`.

What the schedule runs, every ``--every``:

    vantage run --unattended --max-runtime S --list NAME

``--unattended`` measures only when consent is recorded in the config (it
never asks: one line and exit 2 otherwise), is skipped while another run uses
the database (``probes.spool.RunLock``; systemd's timer never starts a second
instance of a service still running either), and afterwards runs `vantage
upload` when the config's ``UPLOAD_AFTER_RUN`` setting is true and the
volunteer agreed to uploading in the consent notice (``CONSENT_UPLOAD``). Its outcome
goes to ``<db>.last-run.json`` for `vantage schedule status`; its output to
the journal (systemd) or to a log file (cron).

User units (``~/.config/systemd/user``) when not root, system units
(``/etc/systemd/system``) when root. ``unit_dir`` / ``crontab_file`` let
tests write the files somewhere else, and then nothing calls systemctl or
crontab.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import paths
from core.errors import VantageError

UNIT = "vantage-measure"  # vantage-measure.service + vantage-measure.timer
CRON_MARKER = "# vantage-schedule"
LOG_MAX_BYTES = 1024 * 1024  # the cron log is rotated once beyond this (one old copy kept)

# The config setting that makes a scheduled run upload afterwards (off until
# the volunteer agrees in the consent notice: CONSENT_UPLOAD too). The upload command and the
# setting's row in probes/config.py SETTINGS belong to `vantage upload`.
UPLOAD_AFTER_RUN = "upload_after_run"
CONSENT_UPLOAD = "consent_upload"  # set when the volunteer agrees to uploading (probes/consent.py)

NO_CONSENT_UNATTENDED = ("no consent recorded in {config}: a scheduled run never asks; run `vantage run` once at a "
                         "terminal to read and accept the notice, or `vantage schedule remove`")

DEFAULT_EVERY = "6h"
DEFAULT_MAX_RUNTIME = 1800
DEFAULT_LIST = "default"


class ScheduleError(VantageError):
    """A schedule problem the user can fix (one line, exit 2)."""


# --------------------------------------------------------------------------
# The interval: one that divides an hour or a day, so systemd's calendar and
# cron's fields say the same thing (and a Pi that was off catches up).

@dataclass(frozen=True)
class Every:
    text: str  # normalised: "30m", "6h", "1d"
    seconds: int
    on_calendar: str  # systemd OnCalendar=
    cron: str  # the five cron fields


def parse_every(text: str) -> Every:
    m = re.fullmatch(r"\s*(\d+)\s*(m|min|h|d)\s*", str(text).lower())
    if not m:
        raise ScheduleError(f"--every {text}: give minutes, hours or days, like 30m, 6h or 1d")
    number, unit = int(m.group(1)), m.group(2)
    minutes = number * {"m": 1, "min": 1, "h": 60, "d": 1440}[unit]
    if minutes < 60 and 60 % minutes == 0 and minutes >= 10:
        return Every(f"{minutes}m", minutes * 60, f"*-*-* *:00/{minutes}:00", f"*/{minutes} * * * *")
    if minutes % 60 == 0 and 1440 % minutes == 0:
        hours = minutes // 60
        if hours == 24:
            return Every("1d", 86400, "*-*-* 00:00:00", "0 0 * * *")
        return Every(f"{hours}h", hours * 3600, f"*-*-* 00/{hours}:00:00", f"0 */{hours} * * *" if hours > 1 else "0 * * * *")
    raise ScheduleError(f"--every {text}: use an interval that divides an hour or a day (10m, 15m, 20m, 30m, 1h, 2h, "
                        "3h, 4h, 6h, 8h, 12h or 1d)")


def next_after(every: Every, now: dt.datetime) -> dt.datetime:
    """The next start of a schedule of ``every`` after ``now`` (local time, as
    cron counts), before systemd's random delay."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed = (now - midnight).total_seconds()
    return midnight + dt.timedelta(seconds=(int(elapsed // every.seconds) + 1) * every.seconds)


# --------------------------------------------------------------------------
# What runs.

def vantage_command() -> list[str]:
    """The command that starts this Vantage: its console script beside the
    interpreter when installed, else ``python -m cli.main``."""
    script = Path(sys.executable).parent / "vantage"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "cli.main"]


def run_command(max_runtime: int, list_name: str) -> list[str]:
    return [*vantage_command(), "run", "--unattended", "--max-runtime", str(int(max_runtime)), "--list", list_name]


@dataclass(frozen=True)
class Plan:
    every: Every
    max_runtime: int
    list_name: str
    config_path: Path
    command: list[str]
    workdir: Path  # where `python -m cli.main` finds the code, when not installed


def plan(every: str = DEFAULT_EVERY, max_runtime: int = DEFAULT_MAX_RUNTIME, list_name: str = DEFAULT_LIST,
         config_path: str | os.PathLike | None = None) -> Plan:
    if not 60 <= int(max_runtime) <= 86400:
        raise ScheduleError("--max-runtime: between 60 and 86400 seconds")
    interval = parse_every(every)
    if int(max_runtime) > interval.seconds:
        raise ScheduleError(f"--max-runtime {max_runtime} is longer than --every {interval.text}: "
                            "runs would overlap (an overlapping run is skipped)")
    if not re.fullmatch(r"[A-Za-z0-9._/~+-]+", list_name):
        raise ScheduleError(f"--list {list_name}: a list name (default, high-risk, global, a country code) or a path")
    target = Path(config_path).expanduser().resolve() if config_path else paths.config_path().resolve()
    return Plan(interval, int(max_runtime), list_name, target, run_command(max_runtime, list_name),
                Path(__file__).resolve().parent.parent)


def _systemd_quote(arg: str) -> str:
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def service_unit(p: Plan, system: bool | None = None) -> str:
    """The oneshot service. ``system`` (default: running as root): a system
    unit, which may wait for the network; a user instance of systemd cannot
    see network-online.target (an offline run is recorded as such anyway)."""
    system = is_root() if system is None else system
    exec_start = " ".join(_systemd_quote(a) for a in p.command)
    network = "Wants=network-online.target\nAfter=network-online.target\n" if system else ""
    return f"""\
# Written by `vantage schedule install`; `vantage schedule remove` deletes it.
[Unit]
Description=Vantage: a scheduled censorship measurement (list {p.list_name}, at most {p.max_runtime} s)
{network}
[Service]
Type=oneshot
Environment={_systemd_quote("VANTAGE_CONFIG=" + str(p.config_path))}
Environment=PYTHONUNBUFFERED=1
WorkingDirectory={_systemd_quote(str(p.workdir))}
ExecStart={exec_start}
# The run stops starting measurements after --max-runtime; this is the backstop.
TimeoutStartSec={p.max_runtime + 900}
# SIGINT, like Ctrl-C: the run stores every finished measurement before it exits.
KillSignal=SIGINT
TimeoutStopSec=120
Nice=10
IOSchedulingClass=idle
"""


def timer_unit(p: Plan) -> str:
    delay = min(900, p.every.seconds // 4)
    return f"""\
# Written by `vantage schedule install`; `vantage schedule remove` deletes it.
[Unit]
Description=Vantage: measure every {p.every.text}

[Timer]
OnCalendar={p.every.on_calendar}
RandomizedDelaySec={delay}
# A Pi that was off at the scheduled time measures soon after it starts.
Persistent=true
Unit={UNIT}.service

[Install]
WantedBy=timers.target
"""


def log_path() -> Path:
    """The cron schedule's log (systemd's goes to the journal)."""
    return paths.data_dir() / "schedule.log"


def cron_line(p: Plan, log: str | os.PathLike | None = None) -> str:
    log = Path(log) if log else log_path()
    env = [f"VANTAGE_CONFIG={shlex.quote(str(p.config_path))}", f"VANTAGE_SCHEDULE_LOG={shlex.quote(str(log))}"]
    command = " ".join(shlex.quote(a) for a in p.command)
    text = f"{p.every.cron} cd {shlex.quote(str(p.workdir))} && {' '.join(env)} {command} >> {shlex.quote(str(log))} 2>&1"
    return text.replace("%", "\\%") + f" {CRON_MARKER}"


# --------------------------------------------------------------------------
# Which scheduler, and where its files go.

def is_root() -> bool:
    return os.geteuid() == 0


def has_systemd() -> bool:
    """systemctl exists and systemd is running (containers often ship the one without the other)."""
    return shutil.which("systemctl") is not None and Path("/run/systemd/system").is_dir()


def choose(scheduler: str = "auto", unit_dir: str | os.PathLike | None = None,
           crontab_file: str | os.PathLike | None = None) -> str:
    if unit_dir:
        return "systemd"
    if crontab_file:
        return "cron"
    if scheduler == "systemd" or (scheduler == "auto" and has_systemd()):
        if shutil.which("systemctl") is None:
            raise ScheduleError("systemctl not found: this system has no systemd (try --scheduler cron)")
        return "systemd"
    if shutil.which("crontab") is None:
        raise ScheduleError("neither systemd nor cron (crontab) found: install cron, or run `vantage run` yourself")
    return "cron"


def default_unit_dir() -> Path:
    if is_root():
        return Path("/etc/systemd/system")
    base = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if base and os.path.isabs(base) else Path.home() / ".config") / "systemd" / "user"


def _systemctl(*args: str) -> subprocess.CompletedProcess:
    cmd = ["systemctl", *([] if is_root() else ["--user"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise ScheduleError(f"{what} failed: {reason}")


def _read_crontab(crontab_file: str | os.PathLike | None) -> str:
    if crontab_file:
        try:
            return Path(crontab_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""
    proc = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""  # exit 1: no crontab yet


def _write_crontab(text: str, crontab_file: str | os.PathLike | None) -> None:
    if crontab_file:
        Path(crontab_file).write_text(text, encoding="utf-8")
        return
    _check(subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True), "crontab")


def _without_ours(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.rstrip().endswith(CRON_MARKER)]


# --------------------------------------------------------------------------
# install / remove / status

def install(p: Plan, config, scheduler: str = "auto", unit_dir: str | os.PathLike | None = None,
            crontab_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write and enable the schedule. Refused while no consent is recorded
    (the runs would refuse to measure). Returns what was done."""
    if not config.consent_given:
        raise ScheduleError(f"no consent recorded in {config.path}: run `vantage run` once at a terminal to read and "
                            "accept the notice, then install the schedule")
    kind = choose(scheduler, unit_dir, crontab_file)
    done: dict[str, Any] = {"scheduler": kind, "every": p.every.text, "max_runtime": p.max_runtime,
                            "list": p.list_name, "config": str(p.config_path), "command": p.command, "warnings": []}
    if kind == "systemd":
        directory = Path(unit_dir) if unit_dir else default_unit_dir()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{UNIT}.service").write_text(service_unit(p), encoding="utf-8")
        (directory / f"{UNIT}.timer").write_text(timer_unit(p), encoding="utf-8")
        done["files"] = [str(directory / f"{UNIT}.service"), str(directory / f"{UNIT}.timer")]
        if unit_dir is None:
            _check(_systemctl("daemon-reload"), "systemctl daemon-reload")
            _check(_systemctl("enable", "--now", f"{UNIT}.timer"), f"systemctl enable {UNIT}.timer")
            if not is_root():
                # User timers run only while the user is logged in, unless lingering is on.
                linger = subprocess.run(["loginctl", "enable-linger"], capture_output=True, text=True) \
                    if shutil.which("loginctl") else None
                if linger is None or linger.returncode != 0:
                    done["warnings"].append("could not turn on lingering: the schedule runs only while you are logged "
                                            "in (ask an administrator for `loginctl enable-linger USER`)")
    else:
        lines = _without_ours(_read_crontab(crontab_file))
        log = log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        lines.append(cron_line(p, log))
        _write_crontab("\n".join(lines) + "\n", crontab_file)
        done["log"] = str(log)
    return done


def remove(scheduler: str = "auto", unit_dir: str | os.PathLike | None = None,
           crontab_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Stop and delete the schedule (a run in progress finishes). Measurements,
    the database and the config stay."""
    removed: list[str] = []
    kinds = [choose(scheduler, unit_dir, crontab_file)] if (unit_dir or crontab_file or scheduler != "auto") else \
        [k for k, ok in (("systemd", shutil.which("systemctl")), ("cron", shutil.which("crontab"))) if ok]
    for kind in kinds:
        if kind == "systemd":
            directory = Path(unit_dir) if unit_dir else default_unit_dir()
            if unit_dir is None and (directory / f"{UNIT}.timer").exists():
                _systemctl("disable", "--now", f"{UNIT}.timer")
            for name in (f"{UNIT}.timer", f"{UNIT}.service"):
                if (directory / name).exists():
                    (directory / name).unlink()
                    removed.append(str(directory / name))
            if unit_dir is None and removed:
                _systemctl("daemon-reload")
        else:
            text = _read_crontab(crontab_file)
            kept = _without_ours(text)
            if len(kept) != len(text.splitlines()):
                _write_crontab("\n".join(kept) + ("\n" if kept else ""), crontab_file)
                removed.append("crontab line")
    return {"removed": removed}


def status(config, scheduler: str = "auto", unit_dir: str | os.PathLike | None = None,
           crontab_file: str | os.PathLike | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Installed or not, with what; the next run; the last run's outcome; a run in progress."""
    from .spool import RunLock

    now = now or dt.datetime.now()
    found: dict[str, Any] = {"installed": False, "scheduler": None, "next_run": None}
    systemd_dir = Path(unit_dir) if unit_dir else (default_unit_dir() if not crontab_file else None)
    if systemd_dir is not None and (systemd_dir / f"{UNIT}.timer").exists():
        timer = (systemd_dir / f"{UNIT}.timer").read_text(encoding="utf-8")
        service = (systemd_dir / f"{UNIT}.service").read_text(encoding="utf-8") \
            if (systemd_dir / f"{UNIT}.service").exists() else ""
        found.update(installed=True, scheduler="systemd", files=[str(systemd_dir / f"{UNIT}.timer")])
        found["command"] = next((line.split("=", 1)[1] for line in service.splitlines() if line.startswith("ExecStart=")), None)
        calendar = next((line.split("=", 1)[1] for line in timer.splitlines() if line.startswith("OnCalendar=")), None)
        if unit_dir is None and shutil.which("systemctl"):
            proc = _systemctl("show", f"{UNIT}.timer", "--property=NextElapseUSecRealtime", "--value")
            value = proc.stdout.strip()
            found["next_run"] = value if proc.returncode == 0 and value and value != "n/a" else None
            active = _systemctl("is-active", f"{UNIT}.timer").stdout.strip()
            found["timer"] = active or "unknown"
        elif calendar:
            every = _every_of_calendar(calendar)
            found["next_run"] = next_after(every, now).isoformat(sep=" ", timespec="minutes") if every else None
    elif crontab_file or (systemd_dir is None or not has_systemd()) and shutil.which("crontab"):
        ours = [line for line in _read_crontab(crontab_file).splitlines() if line.rstrip().endswith(CRON_MARKER)]
        if ours:
            found.update(installed=True, scheduler="cron", command=ours[0].removesuffix(CRON_MARKER).strip(),
                         log=str(log_path()))
            every = _every_of_cron(ours[0])
            found["next_run"] = next_after(every, now).isoformat(sep=" ", timespec="minutes") if every else None
    db = str(config.db)
    found["database"] = db
    found["last_run"] = read_last_run(db)
    holder = RunLock(db).holder()
    found["running"] = holder if holder else None
    found["consent_given"] = bool(config.consent_given)
    found["upload_after_run"] = upload_after_run(config)
    return found


def _every_of_calendar(calendar: str) -> Every | None:
    for text in ("10m", "15m", "20m", "30m", "1h", "2h", "3h", "4h", "6h", "8h", "12h", "1d"):
        if parse_every(text).on_calendar == calendar:
            return parse_every(text)
    return None


def _every_of_cron(line: str) -> Every | None:
    fields = " ".join(line.split()[:5])
    for text in ("10m", "15m", "20m", "30m", "1h", "2h", "3h", "4h", "6h", "8h", "12h", "1d"):
        if parse_every(text).cron == fields:
            return parse_every(text)
    return None


# --------------------------------------------------------------------------
# The scheduled run's side: its outcome, the upload, the log.

def last_run_path(db_file: str | os.PathLike) -> Path:
    return paths.beside_db(db_file, ".last-run.json")


def record_last_run(result: str, runs: list[dict[str, Any]], db_file: str | os.PathLike,
                    upload: str | None = None) -> None:
    """Best effort: a full disk must not turn a stored run into a failed one."""
    entry = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "result": result, "runs": runs,
             "upload": upload}
    target = last_run_path(db_file)
    try:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(entry) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError:
        pass


def read_last_run(db_file: str | os.PathLike) -> dict[str, Any] | None:
    try:
        data = json.loads(last_run_path(db_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def upload_after_run(config) -> bool:
    """Upload after a scheduled run: the setting is true and the volunteer
    agreed to uploading in the consent notice (``consent_upload``). `vantage
    upload` run by hand needs neither: it is an explicit act."""
    values = config.as_dict()
    return values.get(UPLOAD_AFTER_RUN) is True and values.get(CONSENT_UPLOAD) is True


def upload(config, db_file: str) -> str:
    """`vantage upload` for the config and database of the run: "ok", or what went wrong."""
    env = dict(os.environ, VANTAGE_CONFIG=str(config.path), VANTAGE_DB=str(db_file))
    proc = subprocess.run([*vantage_command(), "upload"], env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode == 0:
        return "ok"
    if proc.returncode == 3:  # `vantage upload`: some stay pending (offline, refused); the next upload sends them
        return "pending"
    return f"failed (exit {proc.returncode})"


def rotate_log() -> None:
    """The cron log (VANTAGE_SCHEDULE_LOG) keeps one old copy beyond LOG_MAX_BYTES."""
    name = os.environ.get("VANTAGE_SCHEDULE_LOG")
    if not name:
        return
    try:
        if os.path.getsize(name) > LOG_MAX_BYTES:
            os.replace(name, name + ".1")
    except OSError:
        pass
