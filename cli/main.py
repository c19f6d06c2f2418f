"""The `vantage` command line: thin wiring of probes/, analysis/, services/ and lab/.

Each package contributes its commands from its own ``cli.py``; a package whose
optional dependencies are missing simply does not add its commands.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .common import UsageFailure

_MOUNTS = (
    # (module, attribute) — each attribute is a click command or group.
    ("cli.run", "run"),
    ("cli.results", "results"),
    ("test_lists.cli", "lists"),
    ("probes.geo_cli", "geo"),
    ("analysis.cli", "analyze"),
    ("analysis.cli", "fingerprints"),
    ("services.cli", "helper"),
    ("lab.cli", "lab"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vantage")
def cli() -> None:
    """Vantage: measure internet censorship (DNS, TCP, TLS, HTTP) against a control."""


def _mount() -> None:
    for module_name, attr in _MOUNTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in {"cli", "probes", "analysis", "services", "lab", "test_lists"}:
                continue  # not built yet
            raise
        command = getattr(module, attr, None)
        if command is not None:
            cli.add_command(command)


_mount()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # Usage errors and our own failures: one line, exit 2.
        click.echo(f"vantage: {exc.format_message()}", err=True)
        sys.exit(2)
    except UsageFailure as exc:
        click.echo(f"vantage: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line for the user, details on request
        if os.environ.get("VANTAGE_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        click.echo(f"vantage: internal error: {type(exc).__name__}: {first} (VANTAGE_DEBUG=1 shows details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
