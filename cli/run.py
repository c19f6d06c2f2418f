"""`vantage run`: measure a list of URLs and store every observation in DuckDB."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
import json
import sys
from typing import Any

import click

from .common import UsageFailure, db_option, json_option

TESTS = ("web", "throttling", "all")


def _test_specs(name: str):
    from probes import web_connectivity as wc
    from probes.runner import Experiment

    web = Experiment(wc.TEST_NAME, wc.TEST_VERSION, wc.measure, wc.new_test_keys, wc.outcome_label)
    specs = {"web": [web]}
    try:
        th = importlib.import_module("probes.throttling")
        specs["throttling"] = [Experiment(th.TEST_NAME, th.TEST_VERSION, th.measure, th.new_test_keys, th.outcome_label)]
    except ModuleNotFoundError:
        specs["throttling"] = []
    specs["all"] = specs["web"] + specs["throttling"]
    if not specs[name]:
        raise UsageFailure(f"the {name} test is not available in this build")
    return specs[name]


def _load_config(path: str | None):
    try:
        from probes.config import load_config
    except ModuleNotFoundError:
        return None
    try:
        return load_config(path) if path else load_config()
    except Exception as exc:  # ConfigError and friends: one line
        raise UsageFailure(str(exc)) from None


def _setting(config: Any, name: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = config.get(name) if hasattr(config, "get") else getattr(config, name, None)
    return default if value in (None, "", []) else value


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
    except (loader.ListError, OSError) as exc:
        raise UsageFailure(str(exc)) from None
    if not entries:
        raise UsageFailure("no URLs to measure (check --category and the list)")
    return entries


async def _locate(config, probe_cc: str | None, probe_asn: str | None, quiet: bool):
    from probes.runner import Location, local_addresses

    location = Location(scrub_ips=local_addresses())
    try:
        from probes import geo
    except ModuleNotFoundError:
        geo = None
    if probe_cc and probe_asn:
        location.probe_cc, location.probe_asn = probe_cc.upper(), probe_asn.upper()
        if not location.probe_asn.startswith("AS"):
            location.probe_asn = "AS" + location.probe_asn
        return location
    if geo is not None:
        found = await geo.discover_probe_location(config)
        location.probe_cc, location.probe_asn = found.cc, found.asn
        location.network_name = getattr(found, "network_name", None)
        if getattr(found, "ip_for_scrubbing", None):
            location.scrub_ips.append(found.ip_for_scrubbing)
        if getattr(found, "warning", None) and not quiet:
            click.echo(f"warning: {found.warning}", err=True)
    if probe_cc:
        location.probe_cc = probe_cc.upper()
    if probe_asn:
        location.probe_asn = probe_asn.upper() if probe_asn.upper().startswith("AS") else "AS" + probe_asn
    return location


@click.command()
@click.argument("test", type=click.Choice(TESTS), default="web", required=False)
@click.option("--list", "list_name", help="Test list: default, global, a country code, or a CSV path.")
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
@click.option("--public-network", "public_networks", multiple=True, help="CIDR to treat as public address space (labs).")
@click.option("--probe-cc", help="Override the probe's country code.")
@click.option("--probe-asn", help="Override the probe's ASN (e.g. AS3269).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file (TOML).")
@click.option("--yes", "-y", "assume_yes", is_flag=True, help="Accept the informed-consent notice (unattended runs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@json_option
def run(test, list_name, input_file, urls, categories, helpers, db_path, concurrency, max_runtime, resume_id,
        ca_file, resolver, doh_url, no_doh, public_networks, probe_cc, probe_asn, config_path, assume_yes, quiet, as_json):
    """Measure URLs (DNS, TCP, TLS, HTTP) against a control; store results in DuckDB."""
    from probes import store

    config = _load_config(config_path)
    try:
        from probes.consent import NO_CONSENT_MESSAGE, ensure_consent, is_interactive
    except ModuleNotFoundError:
        ensure_consent = None
    if ensure_consent is not None and config is not None and not ensure_consent(config, assume_yes=assume_yes, interactive=is_interactive()):
        raise UsageFailure(NO_CONSENT_MESSAGE)

    if config is not None:
        # The same checks as the config file (one-line errors, exit 2).
        overrides = {"resolver": resolver, "doh_url": doh_url, "probe_cc": probe_cc, "probe_asn": probe_asn,
                     "helpers": list(helpers) or None}
        config = config.replace(**{k: v for k, v in overrides.items() if v})
    if ca_file:
        import ssl

        from probes.tls import make_context

        try:
            make_context(ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise UsageFailure(f"--ca-file {ca_file}: not a usable PEM CA certificate ({exc})") from None
    if categories and (urls or input_file):
        raise UsageFailure("--category filters a test list (--list); it cannot apply to --url or --input-file")

    try:
        db_file = str(db_path or _setting(config, "db"))
        con = store.connect(db_file, memory_limit=store.PROBE_MEMORY_LIMIT, threads=store.PROBE_THREADS)
    except store.StoreError as exc:
        raise UsageFailure(str(exc)) from None

    from probes import runner as runner_mod

    if resume_id:
        row = con.execute("SELECT test_name, options, status FROM runs WHERE run_id = ?", [resume_id]).fetchone()
        if row is None:
            raise UsageFailure(f"no run {resume_id} in {db_path or 'the database'}")
        options = json.loads(row[1] or "{}")
        entries = runner_mod.remaining_inputs(con, resume_id)
        # A run is one test (`all` starts one run per test): resume that test.
        test = {"web_connectivity": "web", "throttling": "throttling"}.get(row[0], "web")
        run_id = resume_id
    else:
        entries = _inputs(urls, input_file, list_name, categories)
        run_id = None
        options = {}
    options.update({k: v for k, v in {
        "test": test, "helpers": list(helpers) or options.get("helpers"), "ca_file": ca_file or options.get("ca_file"),
        "resolver": resolver or options.get("resolver"), "doh_url": doh_url or options.get("doh_url"),
        "no_doh": no_doh or options.get("no_doh", False),
        "public_networks": list(public_networks) or options.get("public_networks") or [],
        "probe_cc": probe_cc or options.get("probe_cc"), "probe_asn": probe_asn or options.get("probe_asn"),
    }.items()})

    specs = _test_specs(options["test"])
    try:
        summaries = asyncio_run(_run(con, db_file, entries, specs, options, config, run_id, concurrency, max_runtime, quiet or as_json))
    except store.StoreError as exc:
        raise UsageFailure(str(exc)) from None
    _print_summary(summaries, as_json, db_path)


def asyncio_run(coro):
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        # _run stored every finished measurement and marked the run interrupted.
        click.echo("interrupted: finished measurements are stored; resume with `vantage run --resume RUN_ID`", err=True)
        sys.exit(130)


async def _run(con, db_file, entries, specs, options, config, run_id, concurrency, max_runtime, quiet):
    import aiohttp

    from probes import store
    from probes.context import ProbeContext
    from probes.records import new_id
    from probes.runner import finish_run, remaining_inputs, run_inputs, start_run
    from probes.timeouts import Timeouts

    from concurrent.futures import ThreadPoolExecutor

    _limit_malloc_arenas()
    # getaddrinfo runs in the default executor; its default size (cores + 4)
    # would cap system lookups far below the run's concurrency.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=max(8, concurrency or 50)))
    location = await _locate(config, options.get("probe_cc"), options.get("probe_asn"), quiet)
    helpers = options.get("helpers") or list(_setting(config, "helpers", []) or [])
    ctx = ProbeContext(
        timeouts=Timeouts(),
        resolver=options.get("resolver") or _setting(config, "resolver") or None,  # config default: /etc/resolv.conf
        doh_url=None if options.get("no_doh") else (options.get("doh_url") or _setting(config, "doh_url")),
        helpers=helpers,
        extra_ca_file=options.get("ca_file") or _setting(config, "extra_ca_file"),
    )
    concurrency = concurrency or int(_setting(config, "concurrency", 50))
    summaries = []
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx.tls())
    async with aiohttp.ClientSession(connector=connector) as session:
        ctx.session = session
        for spec in specs:
            this_run = run_id or new_id()
            if run_id is None:
                start_run(con, this_run, spec, entries, options, location)
            todo = entries if run_id is None else remaining_inputs(con, this_run)
            rescue = Path(db_file).with_name(f"{Path(db_file).stem}.rescue-{this_run}.jsonl")
            sink = store.Sink(con, rescue_path=rescue)
            status = "interrupted"
            progress = _Progress(len(todo), spec.name, quiet)
            try:
                with progress:
                    summary = await run_inputs(
                        todo, test=spec, ctx=ctx, sink=sink, run_id=this_run, location=location,
                        concurrency=concurrency, max_runtime=max_runtime, on_result=progress.advance,
                    )
                status = summary.status
                summaries.append(summary)
            finally:
                try:
                    sink.close()
                finally:
                    try:
                        finish_run(con, this_run, status)
                        con.execute("CHECKPOINT")
                    except Exception:  # the database already failed; sink.close said so
                        pass
    return summaries


def _limit_malloc_arenas() -> None:
    """glibc gives each resolver thread its own malloc arena, which it keeps;
    two arenas are plenty for a probe that spends its time waiting (-10 MB
    of RSS on a 10,000-URL run). No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


class _Progress:
    """A rich progress bar with counts by outcome, on stderr; silent when quiet."""

    def __init__(self, total: int, name: str, quiet: bool):
        self.quiet = quiet
        self.counts: dict[str, int] = {}
        if quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"), console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(name, total=total, counts="")

    def __enter__(self):
        if not self.quiet:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.quiet:
            self.progress.__exit__(*exc)

    def advance(self, url: str, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1
        if not self.quiet:
            text = "  ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            self.progress.update(self.task, advance=1, counts=text)


def _print_summary(summaries, as_json: bool, db_path) -> None:
    if as_json:
        click.echo(json.dumps([{
            "run_id": s.run_id, "status": s.status, "measured": s.measured, "total": s.total,
            "seconds": round(s.seconds, 3), "outcomes": dict(s.outcomes), "network_unreachable": s.network_down,
        } for s in summaries], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for s in summaries:
        table = Table(title=f"run {s.run_id} — {s.status}, {s.measured}/{s.total} measured in {s.seconds:.1f} s")
        table.add_column("probe-side outcome")
        table.add_column("URLs", justify="right")
        for label, count in s.outcomes.most_common():
            table.add_row(label, str(count))
        console.print(table)
        if s.measured and s.network_down == s.measured:
            console.print(
                "[bold yellow]The network is unreachable from this probe[/]: nothing could be reached, so these "
                "measurements say nothing about censorship."
            )
        console.print("Outcomes are what the probe saw, not verdicts: run `vantage analyze` to compare with the control.")
