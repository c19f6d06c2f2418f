"""Informed consent before the first measurement.

Measuring censorship can put a volunteer at risk, so Vantage does not send a
single probe until the person running it has said they understand what is
visible to others. The answer is recorded in the config file
(``consent_given = true``) so it is asked once per user, not once per run.

This module holds the notice and the decision; asking the question is the
command line's job (cli/consent.py passes ``ask`` and ``warn``).
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Callable, Mapping

from .config import Config, ConfigError, save_setting

_NOTICE = """\
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
{lists}* Measurements are stored locally on this computer, in a DuckDB file. To
  measure, Vantage contacts the sites themselves, a DNS-over-HTTPS resolver
  (dns.google by default), a public-IP lookup service (to find your country and
  network) and, when configured, a control helper, which learns each URL tested.
* Each measurement records your country and network (ASN). Your IP address is
  never stored, and Vantage removes it from the web pages it keeps.
{upload}
You can withdraw at any time: set consent_given = false in the config file{where}
"""

_UPLOAD = """* Uploading is off unless you agree. With upload_after_run = true, each
  scheduled run sends its measurements to the configured collector
  (collector_url{collector}): the sites tested and when, the DNS answers,
  connections and web pages received, your country and network (ASN).
  Your IP address is never sent (Vantage removes it again before sending),
  but the collector, and anyone watching, sees the connection come from you
  unless you upload through Tor (vantage upload --socks5). Scheduled uploads
  happen only once you agree (consent_upload = true, asked at a terminal);
  `vantage upload` run by hand always sends. Set consent_upload = false to stop.
"""

CONSENT_QUESTION = "I understand the risks and want to run measurements"

UPLOAD_QUESTION = "Upload my measurements to the collector after each scheduled run"

# The config setting recording the volunteer's agreement to scheduled uploads.
CONSENT_UPLOAD = "consent_upload"

NO_CONSENT_MESSAGE = (
    "measurements need your informed consent: run interactively to read and accept it, "
    "or pass --yes if you have read it (`vantage run --help`)"
)

# The bundled lists, by what they hold: {category code: description}, in the
# order of the file. The caller reads them from the list files
# (cli/consent.py), so what the notice says is what the files hold.
Categories = Mapping[str, str]


def _names(categories: Categories) -> str:
    return ", ".join(f"{name} ({code})" if name and name != code else code for code, name in categories.items())


def lists_paragraph(default: Categories, high_risk: Categories) -> str:
    """The notice's bullet on the bundled lists ("" when not known)."""
    if not default:
        return ""
    text = f"The default list (--list default) holds only these categories: {_names(default)}."
    if high_risk:
        text += (" It leaves out the high-risk categories, which are in a separate list"
                 f" (--list high-risk; use it only if you know it is safe where you are): {_names(high_risk)}.")
    return "* " + textwrap.fill(text, 78, subsequent_indent="  ", break_on_hyphens=False) + "\n"


def notice(config_path: str | os.PathLike | None = None, default: Categories | None = None,
           high_risk: Categories | None = None) -> str:
    """The full notice; with the config file's path it says where to withdraw
    consent, with the bundled lists' categories it says what each holds."""
    where = f":\n  {os.path.abspath(config_path)}" if config_path else "."
    return _NOTICE.format(lists=lists_paragraph(default or {}, high_risk or {}), upload=upload_paragraph(),
                          where=where)


def upload_paragraph(collector_url: str = "") -> str:
    """The notice's bullet on uploading (naming the collector when configured)."""
    return _UPLOAD.format(collector=f" = {collector_url}" if collector_url else "")


def upload_consented(config) -> bool:
    """True when the volunteer agreed to scheduled uploads (``consent_upload``)."""
    return config.as_dict().get(CONSENT_UPLOAD) is True


CONSENT_TEXT = notice()


def essentials(config_path: str | os.PathLike, default: Categories | None = None,
               high_risk: Categories | None = None) -> list[str]:
    """The notice in a few lines, shown on every run that passes --yes (the
    full notice is shown by a run without --yes)."""
    text = ("Your network operator, and anyone able to watch your connection, can see which"
            " sites Vantage tests; in some countries testing sensitive sites is dangerous.")
    if default:
        text += f" The default list holds only: {', '.join(default)}."
        if high_risk:
            text += f" The high-risk categories ({', '.join(high_risk)}) are in --list high-risk."
    lines = ["vantage: with --yes you accept the consent notice (drop --yes to read it all):"]
    lines += textwrap.wrap(text, 78, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    lines += ["  To withdraw, set consent_given = false in the config file:", f"  {os.path.abspath(config_path)}"]
    return lines


def is_interactive() -> bool:
    """True when a person can answer a question (stdin and stderr are terminals)."""
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _record(config: Config, warn: Callable[[str], None] | None, setting: str = "consent_given") -> None:
    # Best effort: a read-only home (container, live USB) must not stop a
    # volunteer who has just consented; they will simply be asked again.
    try:
        save_setting(setting, True, path=config.path)
    except ConfigError as exc:
        if warn is not None:
            warn(f"consent not remembered ({exc})")


def _ask_upload(config: Config, interactive: bool, ask, warn) -> None:
    """upload_after_run is set but the volunteer has not agreed to uploading:
    at a terminal, ask (the upload paragraph, then UPLOAD_QUESTION) and record
    ``consent_upload`` on yes. --yes never agrees to uploading for them."""
    values = config.as_dict()
    if values.get("upload_after_run") is not True or upload_consented(config) or not interactive or ask is None:
        return
    if ask(upload_paragraph(str(values.get("collector_url") or "")), UPLOAD_QUESTION):
        _record(config, warn, CONSENT_UPLOAD)


def ensure_consent(config: Config, assume_yes: bool, interactive: bool,
                   ask: Callable[[str, str], bool] | None = None,
                   warn: Callable[[str], None] | None = None, text: str | None = None) -> bool:
    """Return True when measuring may proceed.

    - already given in the config → True, nothing asked;
    - ``assume_yes`` (``--yes``) → recorded, True;
    - ``interactive`` and an ``ask(text, question)`` → the person is shown
      ``text`` (default: the notice naming the config file) and asked
      ``CONSENT_QUESTION``; an accepted answer is recorded;
    - otherwise False: the caller reports ``NO_CONSENT_MESSAGE`` (exit 2).

    Once measuring may proceed, a volunteer who set ``upload_after_run`` but
    has not agreed to uploading is asked that too, at a terminal only
    (``consent_upload``; scheduled runs upload only with it).

    ``warn(message)`` hears that the answer could not be remembered.
    """
    if config.consent_given:
        _ask_upload(config, interactive, ask, warn)
        return True
    if assume_yes:
        _record(config, warn)
        return True
    if not interactive or ask is None:
        return False
    if ask(text or notice(config.path), CONSENT_QUESTION):
        _record(config, warn)
        _ask_upload(config, interactive, ask, warn)
        return True
    return False
