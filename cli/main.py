"""The `vantage` command line: thin wiring of probes/, analysis/, services/ and lab/.

Every command lives in cli/, one module per command group, imported only when
one of its commands runs. Errors are mapped here, in one place: a
``VantageError`` (a problem the user can fix) or a click usage error prints
``vantage: <message>`` and exits 2; anything else is a bug.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from cli import common
from cli.common import safe
from core.errors import VantageError

# command name -> (module, attribute): each attribute is a click command or group.
_COMMANDS = {
    "run": ("cli.run", "run"),
    "results": ("cli.results", "results"),
    "lists": ("cli.lists", "lists"),
    "geo": ("cli.geo", "geo"),
    "analyze": ("cli.analyze", "analyze"),
    "fingerprints": ("cli.analyze", "fingerprints"),
    "helper": ("cli.helper", "helper"),
    "lab": ("cli.lab", "lab"),
    "report": ("cli.report", "report"),
    "import": ("cli.imports", "import_group"),
    "export": ("cli.export", "export_group"),
    "schedule": ("cli.schedule", "schedule"),
    "collector": ("cli.collector", "collector"),
    "upload": ("cli.upload", "upload"),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs: `vantage run`
    on a Raspberry Pi does not pay for the lab, the helper or the analysis."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module_name, attr = _COMMANDS[name]
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vantage")
def cli() -> None:
    """Vantage: measure internet censorship (DNS, TCP, TLS, HTTP) against a control."""


def program() -> None:
    """The `vantage` command as the process's own program (the console script,
    ``python -m cli.main``): only then is re-running ``sys.orig_argv`` this
    command again, as `vantage run`'s hand-over needs (probes/spool.py).
    A caller's process (a test calling ``main()``) must never be exec'd over."""
    common.OWN_PROGRAM = True
    main()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except VantageError as exc:
        # Messages may quote what a server or a file said: escaped like all network text.
        click.echo(f"vantage: {safe(str(exc))}", err=True)
        sys.exit(2)
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        click.echo(f"vantage: {safe(exc.format_message())}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line for the user, details on request
        if os.environ.get("VANTAGE_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        click.echo(f"vantage: internal error: {type(exc).__name__}: {safe(first)} (VANTAGE_DEBUG=1 shows details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    program()
