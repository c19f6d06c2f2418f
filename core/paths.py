"""Where Vantage keeps its files: one rule for every directory.

XDG base directories, as the spec requires: a relative or empty value of
``XDG_*_HOME`` is ignored (a stray ``XDG_DATA_HOME=""`` must not scatter
files into the working directory). ``VANTAGE_CONFIG`` and ``VANTAGE_DB``
point at one file each, for labs, tests and unattended runs.
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "vantage"


def _xdg(var: str, fallback: Path) -> Path:
    value = os.environ.get(var, "")
    base = Path(value) if value and os.path.isabs(value) else fallback
    return base / APP


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", Path.home() / ".config")


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", Path.home() / ".local" / "share")


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", Path.home() / ".cache")


def config_path() -> Path:
    env = os.environ.get("VANTAGE_CONFIG")
    return Path(env) if env else config_dir() / "config.toml"


def default_db_path() -> Path:
    """The measurement database when neither --db nor the config names one."""
    env = os.environ.get("VANTAGE_DB")
    return Path(env) if env else data_dir() / "vantage.duckdb"


def beside_db(db_file: str | os.PathLike, suffix: str) -> Path:
    """``<database file name><suffix>`` in the database's directory: the one
    rule for the files a database has beside it (``.run.lock``,
    ``.last-run.json``, ``.spool-<run>.jsonl``, ``.rescue-<run>.jsonl``). The
    whole file name, so ``v.duckdb`` and ``v.db`` never share one."""
    db = Path(db_file)
    return db.with_name(f"{db.name}{suffix}")
