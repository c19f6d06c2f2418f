"""Informed consent before the first measurement.

Measuring censorship can put a volunteer at risk, so Vantage does not send a
single probe until the person running it has said they understand what is
visible to others. The answer is recorded in the config file
(``consent_given = true``) so it is asked once per user, not once per run.

This module holds the notice and the decision; asking the question is the
command line's job (cli/consent.py passes ``ask`` and ``warn``).
"""

from __future__ import annotations

import sys
from typing import Callable

from .config import Config, ConfigError, save_setting

CONSENT_TEXT = """\
Before you measure: please read this.

* Your network operator (ISP, employer, school, café), and anyone else able to
  watch your connection, can see which web sites Vantage tests, when, and that
  you are running a measurement tool. The test lists deliberately include
  sites that are blocked or sensitive in many countries (political opposition,
  human rights, LGBT, religion, circumvention tools, adult content...).
* In some countries, testing such sites can be dangerous: it may be illegal or
  attract the attention of the authorities, with serious consequences. If you are
  unsure, talk to someone you trust who knows the local situation, and use a
  custom list (--input-file) or the default list rather than a full test list.
* Measurements are stored locally on this computer, in a DuckDB file. To
  measure, Vantage contacts the sites themselves, a DNS-over-HTTPS resolver
  (dns.google by default), a public-IP lookup service (to find your country and
  network) and, when configured, a control helper, which learns each URL tested.
* Each measurement records your country and network (ASN). Your IP address is
  never stored, and Vantage removes it from the web pages it keeps.

You can withdraw at any time: set consent_given = false in the config file.
"""

CONSENT_QUESTION = "I understand the risks and want to run measurements"

NO_CONSENT_MESSAGE = (
    "measurements need your informed consent: run interactively to read and accept it, "
    "or pass --yes if you have read it (`vantage run --help`)"
)


def is_interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _record(config: Config, warn: Callable[[str], None] | None) -> None:
    # Best effort: a read-only home (container, live USB) must not stop a
    # volunteer who has just consented; they will simply be asked again.
    try:
        save_setting("consent_given", True, path=config.path)
    except ConfigError as exc:
        if warn is not None:
            warn(f"consent not remembered ({exc})")


def ensure_consent(config: Config, assume_yes: bool, interactive: bool,
                   ask: Callable[[str, str], bool] | None = None,
                   warn: Callable[[str], None] | None = None) -> bool:
    """Return True when measuring may proceed.

    - already given in the config → True, nothing asked;
    - ``assume_yes`` (``--yes``) → recorded, True;
    - ``interactive`` and an ``ask(text, question)`` → the person is shown
      ``CONSENT_TEXT`` and asked ``CONSENT_QUESTION``; an accepted answer is
      recorded;
    - otherwise False: the caller reports ``NO_CONSENT_MESSAGE`` (exit 2).

    ``warn(message)`` hears that the answer could not be remembered.
    """
    if config.consent_given:
        return True
    if assume_yes:
        _record(config, warn)
        return True
    if not interactive or ask is None:
        return False
    if ask(CONSENT_TEXT, CONSENT_QUESTION):
        _record(config, warn)
        return True
    return False
