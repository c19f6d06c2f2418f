"""The consent question, asked on the terminal (the notice and the decision
live in probes/consent.py). What the notice says about the bundled lists is
read from the list files."""

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


def list_categories(path) -> dict[str, str]:
    """{category code: description} of a bundled list, in the file's order."""
    from test_lists import loader

    found: dict[str, str] = {}
    for entry in loader.load_list(path):
        code = entry.category_code
        if code and code not in found:
            found[code] = loader.CATEGORY_CODES.get(code) or entry.category_description or code
    return found


def bundled_categories() -> tuple[dict[str, str], dict[str, str]]:
    """The categories of the default list and of the high-risk list."""
    from test_lists import loader

    return list_categories(loader.DEFAULT_LIST), list_categories(loader.HIGH_RISK_LIST)


def ensure_consent(config: Config, assume_yes: bool, interactive: bool | None = None) -> bool:
    """probes.consent.ensure_consent with the question asked on this terminal
    (``interactive`` defaults to whether stdin and stderr are terminals)."""
    if interactive is None:
        interactive = consent.is_interactive()
    default, high_risk = bundled_categories()
    return consent.ensure_consent(config, assume_yes=assume_yes, interactive=interactive, ask=_ask, warn=_warn,
                                  text=consent.notice(config.path, default, high_risk))


def print_essentials(config: Config) -> None:
    """--yes keeps a run unattended, but every such run prints the notice's
    essentials on stderr before it measures: a newcomer who copied a command
    with --yes still reads what is at stake and how to withdraw."""
    default, high_risk = bundled_categories()
    click.echo("\n".join(consent.essentials(config.path, default, high_risk)), err=True)
