"""`vantage schedule` and `vantage run --unattended` (issue 13): the unit files
and the cron line as written (into temporary places: the real system's
systemd and crontab are never touched), consent, and the overlap lock."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probes import schedule, spool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    for key in ("VANTAGE_DB", "VANTAGE_CONFIG", "VANTAGE_SCHEDULE_LOG"):
        env.pop(key, None)
    return env


def _consent(tmp_path, given: bool = True) -> Path:
    config = tmp_path / "cfg" / "vantage" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"consent_given = {'true' if given else 'false'}\ndb = \"{tmp_path / 'v.duckdb'}\"\n")
    return config


def vantage(*args: str, env: dict, timeout: float = 120, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, input=stdin)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- systemd units


def test_install_writes_a_timer_and_a_bounded_oneshot_service(tmp_path, home):
    config = _consent(tmp_path)
    units = tmp_path / "units"
    proc = vantage("schedule", "install", "--unit-dir", str(units), "--every", "6h", "--max-runtime", "1200",
                   "--list", "default", "--config", str(config), env=home)
    assert proc.returncode == 0, proc.stderr
    assert "every 6h" in proc.stdout

    service = (units / "vantage-measure.service").read_text()
    assert "Type=oneshot" in service
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith(" run --unattended --max-runtime 1200 --list default")
    assert f"Environment=VANTAGE_CONFIG={config.resolve()}" in service
    assert "TimeoutStartSec=2100" in service  # the run's budget plus a backstop
    assert "KillSignal=SIGINT" in service  # a stop stores what is measured, like Ctrl-C
    assert ("After=network-online.target" in service) == (os.geteuid() == 0)  # a system unit waits for the network

    timer = (units / "vantage-measure.timer").read_text()
    assert "OnCalendar=*-*-* 00/6:00:00" in timer
    assert "Persistent=true" in timer and "Unit=vantage-measure.service" in timer
    assert "WantedBy=timers.target" in timer

    status = vantage("schedule", "status", "--unit-dir", str(units), "--config", str(config), "--json", env=home)
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["installed"] and found["scheduler"] == "systemd" and found["next_run"]
    assert found["last_run"] is None and found["running"] is None

    removed = vantage("schedule", "remove", "--unit-dir", str(units), "--json", env=home)
    assert removed.returncode == 0 and len(json.loads(removed.stdout)["removed"]) == 2
    assert not list(units.iterdir())
    status = vantage("schedule", "status", "--unit-dir", str(units), "--config", str(config), "--json", env=home)
    assert json.loads(status.stdout)["installed"] is False


def test_install_without_consent_is_refused_in_one_line(tmp_path, home):
    config = _consent(tmp_path, given=False)
    units = tmp_path / "units"
    proc = vantage("schedule", "install", "--unit-dir", str(units), "--config", str(config), env=home)
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and "consent" in proc.stderr
    assert not units.exists()


@pytest.mark.parametrize("every", ["7h", "5m", "banana", "90m", "2d"])
def test_an_interval_cron_and_systemd_cannot_both_keep_is_one_line(tmp_path, home, every):
    config = _consent(tmp_path)
    proc = vantage("schedule", "install", "--unit-dir", str(tmp_path / "u"), "--every", every, "--config", str(config),
                   env=home)
    assert proc.returncode == 2 and len(_lines(proc.stderr)) == 1 and "--every" in proc.stderr


def test_user_units_do_not_name_a_system_target_and_system_units_wait_for_the_network(tmp_path):
    plan = schedule.plan("1h", 600, "default", tmp_path / "config.toml")
    assert "network-online" not in schedule.service_unit(plan, system=False)
    assert "After=network-online.target" in schedule.service_unit(plan, system=True)
    for system in (False, True):
        text = schedule.service_unit(plan, system=system)
        assert "[Unit]" in text and "[Service]" in text and "ExecStart=" in text


def test_a_budget_longer_than_the_interval_is_refused():
    with pytest.raises(schedule.ScheduleError, match="overlap"):
        schedule.plan("30m", 3600)


# ---------------------------------------------------------------- cron


@pytest.mark.parametrize("every, fields", [("15m", "*/15 * * * *"), ("30m", "*/30 * * * *"), ("1h", "0 * * * *"),
                                           ("6h", "0 */6 * * *"), ("12h", "0 */12 * * *"), ("1d", "0 0 * * *"),
                                           ("24h", "0 0 * * *")])
def test_cron_fields_say_what_the_timer_says(every, fields):
    assert schedule.parse_every(every).cron == fields


def test_cron_line_runs_the_bounded_unattended_run_into_a_log(tmp_path):
    plan = schedule.plan("6h", 900, "default", tmp_path / "my config.toml")
    line = schedule.cron_line(plan, tmp_path / "schedule.log")
    assert line.startswith("0 */6 * * * ")
    assert line.endswith(schedule.CRON_MARKER)
    assert "run --unattended --max-runtime 900 --list default" in line
    assert f"VANTAGE_CONFIG='{(tmp_path / 'my config.toml').resolve()}'" in line  # quoted for sh
    assert f">> {tmp_path / 'schedule.log'} 2>&1" in line
    assert "%" not in line.replace("\\%", "")  # cron turns a bare % into a newline


def test_cron_install_keeps_other_lines_and_replaces_its_own(tmp_path, home):
    config = _consent(tmp_path)
    crontab = tmp_path / "crontab"
    crontab.write_text("MAILTO=\"\"\n5 4 * * * /usr/bin/backup\n")
    for every in ("6h", "3h"):  # installed twice: still one line of ours
        proc = vantage("schedule", "install", "--crontab-file", str(crontab), "--every", every, "--config", str(config),
                       env=home)
        assert proc.returncode == 0, proc.stderr
    lines = crontab.read_text().splitlines()
    assert lines[:2] == ["MAILTO=\"\"", "5 4 * * * /usr/bin/backup"]
    ours = [line for line in lines if line.endswith(schedule.CRON_MARKER)]
    assert len(ours) == 1 and ours[0].startswith("0 */3 * * * ")

    status = json.loads(vantage("schedule", "status", "--crontab-file", str(crontab), "--config", str(config), "--json",
                                env=home).stdout)
    assert status["installed"] and status["scheduler"] == "cron"
    next_run = dt.datetime.fromisoformat(status["next_run"])
    assert next_run.hour % 3 == 0 and next_run.minute == 0 and next_run > dt.datetime.now()

    assert vantage("schedule", "remove", "--crontab-file", str(crontab), env=home).returncode == 0
    assert crontab.read_text().splitlines() == lines[:2]


def test_next_after_counts_from_midnight():
    every = schedule.parse_every("6h")
    assert schedule.next_after(every, dt.datetime(2026, 12, 1, 13, 5)) == dt.datetime(2026, 12, 1, 18, 0)
    assert schedule.next_after(every, dt.datetime(2026, 12, 1, 23, 59)) == dt.datetime(2026, 12, 2, 0, 0)


# ---------------------------------------------------------------- --unattended


def test_unattended_without_consent_is_one_line_exit_2_and_never_asks(tmp_path, home):
    _consent(tmp_path, given=False)
    proc = vantage("run", "--unattended", "--url", "http://127.0.0.1:9/", "--yes", env=home, stdin="y\ny\n")
    assert proc.returncode == 2, proc.stderr
    assert len(_lines(proc.stderr)) == 1 and "consent" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "v.duckdb").exists()  # nothing measured
    assert json.loads(schedule.last_run_path(tmp_path / "v.duckdb").read_text())["result"].startswith("refused")
    # --yes does not stand in for a recorded consent either, and nothing was recorded
    assert "consent_given = false" in (tmp_path / "cfg" / "vantage" / "config.toml").read_text()


async def _start(args: list[str], env: dict):
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_a_run_that_overlaps_the_previous_one_is_skipped_never_run_twice(tmp_path, home, http_server):
    _consent(tmp_path)
    db = tmp_path / "v.duckdb"
    common = ["--no-doh", "--probe-cc", "ZZ", "--probe-asn", "AS0"]
    slow = await _start(["run", "--unattended", "--url", http_server.url("/trickle"), *common], home)
    lock = spool.RunLock(db)
    deadline = time.monotonic() + 30
    while lock.holder() is None:  # the first run is measuring
        assert time.monotonic() < deadline and slow.returncode is None
        await asyncio.sleep(0.05)
    assert lock.holder() == slow.pid

    second = await _start(["run", "--unattended", "--url", http_server.url("/page"), *common], home)
    out, err = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 0, err.decode()
    assert _lines(err.decode()) == [f"vantage: skipped: the previous run (pid {slow.pid}) is still using {db}"]
    assert json.loads(schedule.last_run_path(db).read_text())["result"] == "skipped"
    assert http_server.hits.get("/page") is None  # the skipped run measured nothing

    # A run by hand is refused in one line rather than measuring alongside.
    by_hand = await _start(["run", "--url", http_server.url("/page"), "--yes", *common], home)
    out, err = await asyncio.wait_for(by_hand.communicate(), 60)
    assert by_hand.returncode == 2 and len(_lines(err.decode())) == 1 and "another `vantage run`" in err.decode()

    while not list(tmp_path.glob("v.duckdb.spool-*.jsonl")):  # measuring, not still starting
        assert time.monotonic() < deadline and slow.returncode is None
        await asyncio.sleep(0.05)
    slow.send_signal(signal.SIGINT)  # as systemd stops it (KillSignal=SIGINT)
    await asyncio.wait_for(slow.communicate(), 60)
    assert slow.returncode == 130
    assert lock.holder() is None
    assert json.loads(schedule.last_run_path(db).read_text())["result"] == "interrupted"

    # Once the previous run is over, the next one measures, and status reports it.
    after = await _start(["run", "--unattended", "--url", http_server.url("/page"), *common], home)
    out, err = await asyncio.wait_for(after.communicate(), 60)
    assert after.returncode == 0, err.decode()
    last = json.loads(schedule.last_run_path(db).read_text())
    assert last["result"] == "ok" and last["runs"][0]["status"] == "finished" and last["upload"] is None
    status = await _start(["schedule", "status", "--unit-dir", str(tmp_path / "none"), "--json"], home)
    out, _ = await asyncio.wait_for(status.communicate(), 60)
    assert json.loads(out)["last_run"]["runs"][0]["measured"] == 1


def test_the_run_lock_waits_or_refuses(tmp_path):
    first, second = spool.RunLock(tmp_path / "v.duckdb"), spool.RunLock(tmp_path / "v.duckdb")
    assert first.acquire()
    assert not second.acquire() and second.holder() == os.getpid()
    first.release()
    assert second.acquire(wait=True) and first.holder() == os.getpid()
    second.release()
    assert first.holder() is None


def test_upload_after_run_only_when_the_setting_is_true(monkeypatch, tmp_path):
    import cli.run as cli_run

    calls = []
    monkeypatch.setattr(schedule, "upload", lambda config, db: calls.append(db) or "ok")

    class Config:
        def __init__(self, values):
            self.values = values

        def as_dict(self):
            return dict(self.values)

    db = str(tmp_path / "v.duckdb")
    cli_run._after_unattended(Config({"consent_given": True}), db, [])
    assert calls == [] and json.loads(schedule.last_run_path(db).read_text())["upload"] is None
    # Issue 13: the setting alone is not consent to upload.
    cli_run._after_unattended(Config({schedule.UPLOAD_AFTER_RUN: True}), db, [])
    assert calls == [] and json.loads(schedule.last_run_path(db).read_text())["upload"] is None
    cli_run._after_unattended(Config({schedule.CONSENT_UPLOAD: True}), db, [])
    assert calls == [] and json.loads(schedule.last_run_path(db).read_text())["upload"] is None
    cli_run._after_unattended(Config({schedule.UPLOAD_AFTER_RUN: True, schedule.CONSENT_UPLOAD: True}), db, [])
    assert calls == [db] and json.loads(schedule.last_run_path(db).read_text())["upload"] == "ok"


def test_systemd_accepts_the_units(tmp_path):
    """systemd-analyze verify parses the files (no system manager needed): it
    warns about any directive or value it does not take."""
    import os
    import shutil

    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":  # scripts/setup.sh installs it: its absence is a failure
            pytest.fail("systemd-analyze is not installed: under CI=true this test may not skip")
        pytest.skip("systemd-analyze is not installed")  # the content checks above still ran
    plan = schedule.plan("30m", 600, "default", tmp_path / "config.toml")
    for system in (True, False):
        units = tmp_path / ("system" if system else "user")
        units.mkdir()
        (units / f"{schedule.UNIT}.service").write_text(schedule.service_unit(plan, system=system))
        (units / f"{schedule.UNIT}.timer").write_text(schedule.timer_unit(plan))
        proc = subprocess.run(["systemd-analyze", "verify", str(units / f"{schedule.UNIT}.service"),
                               str(units / f"{schedule.UNIT}.timer")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
