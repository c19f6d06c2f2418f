"""`vantage run`: measure a list of URLs and store every observation in DuckDB.

This module parses options and prints; probes/runner.py runs (run_tests).
"""

from __future__ import annotations

import asyncio
import sys

import click

from core.errors import VantageError
from probes.runner import TESTS

from . import common
from .common import cell, console, db_option, json_option, safe, to_json


def _inputs(urls, input_file, list_name, categories) -> list[tuple[str, str | None]]:
    from test_lists import loader

    try:
        if urls:
            entries = [(e.url, e.category_code or None) for e in loader.entries_from_urls(urls)]
        elif input_file and str(input_file).lower().endswith(".csv"):
            entries = [(e.url, e.category_code or None) for e in loader.load_list(input_file)]
        elif input_file:
            entries = [(e.url, e.category_code or None) for e in loader.load_input_file(input_file)]
        else:
            path = loader.resolve_list(list_name or "default")
            entries = [(e.url, e.category_code) for e in loader.load_list(path, categories=categories or None)]
    except OSError as exc:
        raise VantageError(str(exc)) from None
    if not entries:
        if categories and (list_name or "default") == "default":
            raise VantageError(f"no URLs to measure: the default list has no {', '.join(c.upper() for c in categories)} "
                               "sites (the high-risk categories are in --list high-risk)")
        raise VantageError("no URLs to measure (check --category and the list)")
    return entries


def _check_ca_file(path: str, where: str) -> None:
    """The extra CA file loads, or one line naming it (exit 2)."""
    import ssl

    from probes.tls import make_context

    try:
        make_context(path)
    except FileNotFoundError:
        raise VantageError(f"{where} {path}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise VantageError(f"{where} {path}: not a usable PEM CA certificate ({exc})") from None


def _interrupted_runs(runs: dict[str, str], resume_id: str | None) -> list[str]:
    """The runs this command left interrupted (run_tests marked them)."""
    if resume_id:
        return [resume_id]
    return [run_id for run_id, status in runs.items() if status == "interrupted"]


@click.command()
@click.argument("test", type=click.Choice(TESTS), default="web", required=False)
@click.option("--list", "list_name", help="Test list: default (no high-risk categories), high-risk (LGBT, ANON, HUMR, "
                                          "POLR, REL), global, a country code, or a CSV path.")
@click.option("--input-file", type=click.Path(dir_okay=False), help="A file with one URL per line, or a Citizen Lab CSV (*.csv).")
@click.option("--url", "urls", multiple=True, help="A URL to measure (repeatable).")
@click.option("--category", "categories", multiple=True, help="Only URLs of this category code (repeatable).")
@click.option("--helper", "helpers", multiple=True, help="Control helper URL (repeatable; tried in order).")
@db_option
@click.option("--concurrency", type=click.IntRange(1, 1000), help="Measurements in flight at once (default 50).")
@click.option("--max-runtime", type=click.FloatRange(min=1), help="Stop starting new measurements after S seconds.")
@click.option("--resume", "resume_id", help="Finish the interrupted run RUN_ID.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="Extra CA certificate (PEM) to trust.")
@click.option("--resolver", help="UDP DNS resolver to query directly, IP[:PORT] (default: the system's).")
@click.option("--doh-url", help="DNS-over-HTTPS resolver URL.")
@click.option("--no-doh", is_flag=True, help="Do not query a DNS-over-HTTPS resolver.")
@click.option("--target", help="dns-injection/traceroute: an IPv4 address running no DNS resolver (default: the helper's).")
@click.option("--control-domain", help="traceroute: the domain control probes carry (default example.com).")
@click.option("--pause", type=click.FloatRange(min=0, min_open=True),
              help="traceroute: seconds to wait after a blocked probe and after a run that met interference (censors "
                   "keep state; default 5).")
@click.option("--capture/--no-capture", default=None,
              help="web: keep each connection's SYN-ACK, RSTs and FINs (IP TTL, IP ID) to tell injected packets; on by "
                   "default when privileged (root or CAP_NET_RAW), silently off without.")
@click.option("--public-network", "public_networks", multiple=True, help="CIDR to treat as public address space (labs).")
@click.option("--probe-cc", help="Override the probe's country code.")
@click.option("--probe-asn", help="Override the probe's ASN (e.g. AS3269).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (TOML).")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Accept the informed-consent notice (unattended runs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--unattended", is_flag=True,
              help="A scheduled run (`vantage schedule`): measures only if consent is recorded in the config, never "
                   "asks; skipped while another run uses the database; uploads afterwards if upload_after_run is set.")
@json_option
def run(test, list_name, input_file, urls, categories, helpers, db_path, concurrency, max_runtime, resume_id,
        ca_file, resolver, doh_url, no_doh, public_networks, probe_cc, probe_asn, config_path, assume_yes, quiet,
        unattended, as_json, target=None, control_domain=None, capture=None, pause=None):
    """Measure URLs (DNS, TCP, TLS, HTTP) against a control; store results in DuckDB."""
    from probes import runner, spool
    from probes.config import load_config
    from core.net import Policy
    from probes.consent import NO_CONSENT_MESSAGE

    from .consent import ensure_consent, print_essentials

    config = load_config(config_path)
    # `vantage run` as its own program hands its database work over (probes/spool.py):
    # this process becomes the database process and comes back, here, twice.
    back = spool.handed_back() if common.OWN_PROGRAM else None
    if unattended:
        from probes.schedule import NO_CONSENT_UNATTENDED

        if back is None:  # checked once: a hand-over back never refuses what it already measured
            if not config.consent_given:  # never asked, never --yes: the volunteer consents at a terminal
                _record_unattended(str(db_path or config.db), "refused: no consent recorded", [])
                raise VantageError(NO_CONSENT_UNATTENDED.format(config=config.path))
            from probes.schedule import rotate_log

            rotate_log()
        quiet = True
    elif back is None and not ensure_consent(config, assume_yes=assume_yes):
        raise VantageError(NO_CONSENT_MESSAGE)

    # The same checks as the config file (one-line errors, exit 2).
    overrides = {"resolver": resolver, "doh_url": doh_url, "probe_cc": probe_cc, "probe_asn": probe_asn,
                 "helpers": list(helpers) or None}
    config = config.replace(**{k: v for k, v in overrides.items() if v})
    if back is None:  # (the passes after a hand-over go on with what this one checked)
        if ca_file:
            _check_ca_file(ca_file, "--ca-file")
        elif config.extra_ca_file:
            _check_ca_file(config.extra_ca_file,
                           f"extra_ca_file (from {config.sources.get('extra_ca_file', 'the config')}):")
        if categories and (urls or input_file):
            raise VantageError("--category filters a test list (--list); it cannot apply to --url or --input-file")
        try:
            Policy.from_cidrs(public_networks)  # where the probe's redirects may lead (probes/http.py)
        except ValueError as exc:
            raise VantageError(f"--public-network: {exc}") from None

    db_file = str(db_path or config.db)
    # One run per database at a time; this process never opens the database
    # itself (probes/spool.py: DuckDB stays out of the measuring process).
    lock = spool.RunLock(db_file)
    if back is not None:
        lock.adopt(back["lock_fd"])
    elif not lock.acquire():
        holder = lock.holder()
        who = f" (pid {holder})" if holder and holder > 0 else ""
        if unattended:
            click.echo(f"vantage: skipped: the previous run{who} is still using {safe(db_file)}", err=True)
            _record_unattended(db_file, "skipped", [])
            return
        raise VantageError(f"another `vantage run`{who} is using {db_file}: wait for it to end, or use another --db")
    runs: dict[str, str] = {}  # run id -> status, filled by run_tests

    def _measuring(prepared):
        """After ``prepare``: what earlier runs left, the run's inputs and
        options, then the measuring (``runner.run_tests``, not yet awaited).
        Returns (whether a packet test prints JSON lines instead of the summary,
        the coroutine)."""
        nonlocal test, quiet

        for found in prepared["recovered"]:
            if found["stored"] and not quiet:
                click.echo(f"vantage: stored {found['stored']} measurements that run {safe(found['run_id'])} left in its "
                           "spool", err=True)
            if found["status"] == "interrupted" and not found["ended"]:
                click.echo(f"vantage: run {safe(found['run_id'])} was cut short; finish it with "
                           f"`vantage run --resume {safe(found['run_id'])}`", err=True)

        if resume_id:
            resumed = prepared["resume"]
            if resumed.get("missing"):
                raise VantageError(f"no run {resume_id} in {db_path or 'the database'}")
            test, recorded, entries = resumed["test"], resumed["options"], [tuple(i) for i in resumed["inputs"]]
        else:
            recorded, entries = {}, _inputs(urls, input_file, list_name, categories)
        options = runner.run_options({
            "test": test, "helpers": list(helpers), "ca_file": ca_file, "resolver": resolver, "doh_url": doh_url,
            "no_doh": no_doh, "public_networks": list(public_networks), "probe_cc": probe_cc, "probe_asn": probe_asn,
            # A new run records the concurrency it ran with; --resume reuses it unless given again.
            "concurrency": concurrency or (None if resume_id else config.concurrency),
            "target": target, "control_domain": control_domain, "capture": capture is not False, "pause": pause,
        }, recorded)
        if capture is False:  # --no-capture wins over what a resumed run recorded
            options["capture"] = False

        if resume_id and not ca_file and options.get("ca_file"):
            _check_ca_file(options["ca_file"], f"the --ca-file run {resume_id} was started with,")
        if assume_yes and not unattended:
            print_essentials(config)
        if not (options.get("helpers") or config.helpers):
            click.echo("vantage: warning: no control helper (--helper): every verdict will be inconclusive", err=True)
        quiet = quiet or as_json
        packet_lines = _packet_test(options, config, as_json)
        if capture and not packet_lines:
            _capture_note(options["test"])
        work = runner.run_tests(
            None, db_file, runner.experiments(options["test"]), entries, options, config, resume_id=resume_id,
            concurrency=options.get("concurrency"), max_runtime=max_runtime,
            progress=lambda name, total: _Progress(total, name, quiet),
            warn=None if quiet else (lambda message: click.echo(f"warning: {safe(message)}", err=True)),
            runs=runs,
            hand_over=spool.store_elsewhere(db_file, lock, {"packet_lines": packet_lines}) if common.OWN_PROGRAM else None,
        )
        return packet_lines, work

    try:
        if back is not None and back["task"] == "store":  # measured, and the spools are stored
            packet_lines = back["carry"]["packet_lines"]

            def finish():
                return spool.stored(back, runs)
        else:
            if back is None and common.OWN_PROGRAM:
                spool.prepare_elsewhere(db_file, resume_id, lock, carry={})  # comes back as back["task"] "prepare"
            packet_lines = False

            def finish():  # a Ctrl-C while preparing is a run interrupted before it started, below
                nonlocal packet_lines
                prepared = spool.prepared(back) if back is not None else spool.prepare(db_file, resume_id)
                packet_lines, work = _measuring(prepared)
                return asyncio.run(work)
        try:
            summaries = finish()
        except KeyboardInterrupt:
            # run_tests stored every finished measurement and marked the run interrupted.
            ids = _interrupted_runs(runs, resume_id)
            if not ids:
                click.echo("interrupted before a run started: nothing was measured", err=True)
            for run_id in ids:
                click.echo(f"interrupted: finished measurements are stored; resume with `vantage run --resume {safe(run_id)}`",
                           err=True)
            sys.exit(130)
        if not packet_lines:
            _print_summary(summaries, as_json, db_file)
        if unattended:
            _after_unattended(config, db_file, summaries)
        lock.release()
    except BaseException as exc:
        if unattended:  # what `vantage schedule status` reports as the last run
            cut = isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 130)
            _record_unattended(db_file, "interrupted" if cut else "failed",
                               [{"run_id": r, "status": s} for r, s in runs.items()])
        raise


def _record_unattended(db_file: str, result: str, runs: list[dict], upload: str | None = None) -> None:
    from probes import schedule

    schedule.record_last_run(result, runs, db_file, upload=upload)


def _after_unattended(config, db_file: str, summaries) -> None:
    """The scheduled run's epilogue: `vantage upload` when the volunteer chose
    it (probes.schedule.UPLOAD_AFTER_RUN), still under the run's lock; the
    outcome recorded for `vantage schedule status`."""
    from probes import schedule

    runs = [{"run_id": s.run_id, "status": s.status, "measured": s.measured, "total": s.total} for s in summaries]
    upload = None
    if schedule.upload_after_run(config):
        upload = schedule.upload(config, db_file)
        if upload != "ok":
            click.echo(f"vantage: upload after the run: {safe(upload)}", err=True)
    schedule.record_last_run("ok", runs, db_file, upload=upload)


class _Progress:
    """A rich progress bar on stderr, silent when quiet. The counts by outcome
    go on their own line (wrapped if need be), so the bar, the count and the
    elapsed time stay visible on an 80-column terminal however many kinds of
    outcome there are."""

    def __init__(self, total: int, name: str, quiet: bool, out=None):
        self.quiet = quiet
        self.counts: dict[str, int] = {}
        if quiet:
            return
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        counts = self.counts

        class _TwoLines(Progress):
            def get_renderables(self):
                yield self.make_tasks_table(self.tasks)
                if counts:
                    yield Text("  " + "  ".join(f"{safe(k)}: {v}" for k, v in sorted(counts.items())))

        self.progress = _TwoLines(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=out or console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(escape(safe(name)), total=total)

    def __enter__(self):
        if not self.quiet:
            self.progress.__enter__()
        return self.advance

    def __exit__(self, *exc):
        if not self.quiet:
            self.progress.__exit__(*exc)

    def advance(self, url: str, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1
        if not self.quiet:
            self.progress.update(self.task, advance=1)


def _capture_note(test: str) -> None:
    """--capture asked for without the privileges: one line, and the run goes on without it."""
    from probes import packets

    if test in ("web", "all") and not packets.have_privileges():
        click.echo("vantage: note: no packet capture (it needs root or CAP_NET_RAW); measuring without it", err=True)


def _packet_test(options: dict, config, as_json: bool) -> bool:
    """dns-injection and traceroute need raw sockets (one line, exit 2, without
    them) and an IPv4 target; with --json they print one JSON object per input
    as each finishes (the contract), instead of the run summary. True in that case."""
    import ipaddress

    from probes import packets, runner

    test = options["test"]
    if test not in runner.PACKET_TESTS:
        return False
    target = options.get("target")
    if target:
        try:
            ipaddress.IPv4Address(target)
        except ValueError:
            raise VantageError(f"--target {target}: not an IPv4 address") from None
    elif test == "dns-injection" and not (options.get("helpers") or config.helpers):
        raise VantageError("dns-injection needs an address that runs no DNS resolver: --target IP, or a --helper")
    packets.require_privileges()
    if test == "traceroute":
        # A sweep holds ~80 sockets (a TCP connection and two raw sockets per TTL).
        from probes.traceroute import CONCURRENCY

        options["concurrency"] = min(options.get("concurrency") or CONCURRENCY, CONCURRENCY)
    if not as_json:
        return False
    from probes import dns_injection, traceroute

    lines = {dns_injection.TEST_NAME: dns_injection.json_line, traceroute.TEST_NAME: traceroute.json_line}
    import json

    packets.LISTENERS.append(lambda name, url, keys: click.echo(
        json.dumps(lines[name]({"input": url, "test_keys": keys}), default=str, ensure_ascii=True)))
    return True


def _print_summary(summaries, as_json: bool, db_file: str) -> None:
    if as_json:
        click.echo(to_json([{
            "run_id": s.run_id, "status": s.status, "measured": s.measured, "total": s.total,
            "seconds": round(s.seconds, 3), "outcomes": dict(s.outcomes), "network_unreachable": s.network_down,
        } for s in summaries]))
        return
    from rich.table import Table
    from rich.text import Text

    out = console()
    for s in summaries:
        # The title on its own line, not over the narrow table (where it wrapped onto four lines).
        out.print(cell(f"run {safe(s.run_id)} — {safe(s.status)}, {s.measured}/{s.total} measured in {s.seconds:.1f} s",
                       "bold"))
        table = Table()
        table.add_column("probe-side outcome")
        table.add_column("URLs", justify="right")
        for label, count in s.outcomes.most_common():
            table.add_row(cell(label), cell(count))
        out.print(table)
        if s.measured and s.network_down == s.measured:
            out.print(Text.assemble(
                ("The network is unreachable from this probe", "bold yellow"),
                ": nothing could be reached, so these measurements say nothing about censorship.",
            ))
        if s.status in ("partial", "store_failed"):
            from probes import runner

            rescue = runner.rescue_path(db_file, s.run_id)
            out.print(Text.assemble(
                ("Some measurements could not be stored", "bold yellow"),
                f": they are kept in {safe(rescue)}; store them with `vantage results import-rescue {safe(rescue)}`.",
            ))
        out.print("Outcomes are what the probe saw, not verdicts: run `vantage analyze` to compare with the control.")
