"""Shared CLI plumbing: common options, the database the commands read, and
the one rule for printing text that came from the network."""

from __future__ import annotations

import json
import re
from typing import Any

import click

# True when the process's own program is the vantage command (cli.main.program),
# not a caller's (click's test runner, a test calling main()): only then may
# `vantage run` exec into its database process and back (probes/spool.py).
OWN_PROGRAM = False

# Characters a terminal may act on rather than show: C0 controls (ESC starts
# CSI/OSC sequences, BEL, BS, CR rewrite the line), DEL, the C1 controls
# (\x9b is a one-byte CSI, \x9d a one-byte OSC), and the Unicode bidi
# embeddings/overrides/isolates and line/paragraph separators, which reorder
# or break what is shown. Joiners (ZWJ, ZWNJ: needed by Persian and emoji)
# are left alone.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: Any) -> str:
    """``value`` as text a terminal only shows: every control character (C0,
    DEL, C1, bidi controls, line separators) escaped as ``\\xNN``/``\\uNNNN``
    (``\\n``, ``\\r``, ``\\t`` by name), so the result is one line.

    Everything that comes from the network or the database (titles, headers,
    bodies, URLs, failure strings, DNS answers, names from a lookup service)
    goes through here before it is printed. It is plain text: print it with
    click.echo, or wrap it in ``cell()`` for rich, never in a markup string.
    """
    return _UNSAFE.sub(_escape_char, value if isinstance(value, str) else str(value))


def cell(value: Any, style: str = "") -> Any:
    """``safe(value)`` as a rich Text: shown literally, never parsed as rich
    markup ("[bold red]", "[link=...]") nor emoji codes."""
    from rich.text import Text

    return Text(safe(value), style=style)


def to_json(data: Any) -> str:
    """The --json output. ``ensure_ascii`` escapes C0, DEL, C1 and every
    non-ASCII character as \\uNNNN: a terminal shows JSON output literally,
    and a JSON parser gets the exact strings back."""
    return json.dumps(data, indent=2, default=str, ensure_ascii=True)


def console(stderr: bool = False, width: int | None = None):
    """A rich Console for our tables (COLUMNS is honoured when not a terminal)."""
    from rich.console import Console

    return Console(stderr=stderr, width=width)


def db_option(fn):
    return click.option(
        "--db", "db_path", envvar="VANTAGE_DB", type=click.Path(dir_okay=False),
        help="DuckDB file (default: a file under the user's data directory; env VANTAGE_DB).",
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def resolve_db(db_path: str | None) -> str:
    """--db / VANTAGE_DB, else the config file's `db`: the same file `vantage run` wrote."""
    if db_path:
        return db_path
    from probes.config import load_config

    return load_config().db
