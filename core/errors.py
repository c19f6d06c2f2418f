"""The one exception hierarchy of Vantage's packages.

Domain code raises a ``VantageError`` subclass for a problem the user can fix
(a bad path, a malformed file, a missing table) with a message that stands on
its own line; cli/ prints it as ``vantage: <message>`` and exits 2, in one
place (cli/main.py). Anything else escaping a command is a bug.
"""

from __future__ import annotations


class VantageError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""
