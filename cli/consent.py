"""The consent question, asked on the terminal (the notice and the decision
live in probes/consent.py)."""

from __future__ import annotations

import click

from probes import consent
from probes.config import Config


def _ask(text: str, question: str) -> bool:
    # stderr: stdout may be --json.
    click.echo(text, err=True)
    return click.confirm(question, default=False, err=True)


def _warn(message: str) -> None:
    click.echo(f"vantage: warning: {message}", err=True)


def ensure_consent(config: Config, assume_yes: bool, interactive: bool | None = None) -> bool:
    """probes.consent.ensure_consent with the question asked on this terminal
    (``interactive`` defaults to whether stdin and stderr are terminals)."""
    if interactive is None:
        interactive = consent.is_interactive()
    return consent.ensure_consent(config, assume_yes=assume_yes, interactive=interactive, ask=_ask, warn=_warn)
