"""Reading test lists: Citizen Lab CSV files and plain URL files.

A malformed row is an error naming the file and line rather than a row that is
silently skipped: a test list decides what a volunteer measures, so a typo
should be fixed, not hidden.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

from core import paths
from core.errors import VantageError

COLUMNS = ("url", "category_code", "category_description", "date_added", "source", "notes")

# Current Citizen Lab category codes (lists/00-LEGEND-new_category_codes.csv).
# Used only to catch a typo in --category; rows may carry older codes.
CATEGORY_CODES = {
    "ALDR": "Alcohol & Drugs", "REL": "Religion", "PORN": "Pornography",
    "PROV": "Provocative Attire", "POLR": "Political Criticism", "HUMR": "Human Rights Issues",
    "ENV": "Environment", "MILX": "Terrorism and Militants", "HATE": "Hate Speech",
    "NEWS": "News Media", "XED": "Sex Education", "PUBH": "Public Health", "GMB": "Gambling",
    "ANON": "Anonymization and circumvention tools", "DATE": "Online Dating",
    "GRP": "Social Networking", "LGBT": "LGBT", "FILE": "File-sharing", "HACK": "Hacking Tools",
    "COMT": "Communication Tools", "MMED": "Media sharing", "HOST": "Hosting and Blogging Platforms",
    "SRCH": "Search Engines", "GAME": "Gaming", "CULTR": "Culture", "ECON": "Economics",
    "GOVT": "Government", "COMM": "E-commerce", "CTRL": "Control content",
    "IGO": "Intergovernmental Organizations", "MISC": "Miscellaneous content",
}

# Names that resolve to a downloaded Citizen Lab list rather than a path.
REGIONAL_LISTS = {"global", "cis"}

DEFAULT_LIST = Path(__file__).with_name("default.csv")
# The sites whose mere testing is the riskiest in many countries (LGBT,
# circumvention tools, human rights, political criticism, religion): bundled,
# one flag away (--list high-risk), never in the default list.
HIGH_RISK_LIST = Path(__file__).with_name("high-risk.csv")
BUNDLED_LISTS = {"default": DEFAULT_LIST, "high-risk": HIGH_RISK_LIST}


class ListError(VantageError):
    """A test list problem the user can fix; one line, exit 2 via the CLI."""


@dataclass(frozen=True)
class Entry:
    url: str
    category_code: str = ""
    category_description: str = ""
    date_added: str = ""
    source: str = ""
    notes: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def check_url(text: str) -> str | None:
    """Return why ``text`` is not a measurable URL, or None when it is."""
    try:
        parts = urlsplit(text)
        parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        return f"url '{text}' is not a valid URL"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"url '{text}' is not an http(s) URL"
    if any(c.isspace() for c in text):
        return f"url '{text}' contains whitespace"
    return None


def _dedup_key(url: str) -> str:
    # Scheme and host are case-insensitive; the path is not.
    parts = urlsplit(url)
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheets often add a BOM, which would break the header.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ListError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ListError(f"{path}: is a directory, not a test list") from None
    except UnicodeDecodeError as exc:
        raise ListError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ListError(f"{path}: cannot read: {exc.strerror}") from None


def parse_csv(text: str, name: str) -> list[Entry]:
    """Parse Citizen Lab CSV ``text``; ``name`` is used in error messages."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    entries: list[Entry] = []
    seen: set[str] = set()
    line = 1  # physical line where the next record starts (records may span lines)
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = [h.strip().lower() for h in row]
                if "url" not in header:
                    raise ListError(f"{name}:{start}: no 'url' column in the header "
                                    f"(expected {','.join(COLUMNS)})")
                index = {h: i for i, h in enumerate(header)}
                continue
            if len(row) != len(header):
                raise ListError(f"{name}:{start}: {len(row)} columns, the header has {len(header)}")
            url = row[index["url"]].strip()
            problem = check_url(url)
            if problem:
                raise ListError(f"{name}:{start}: {problem}")
            key = _dedup_key(url)
            if key in seen:
                continue  # the same site twice would be measured twice; keep the first
            seen.add(key)
            fields = {c: row[index[c]].strip() for c in COLUMNS if c in index}
            fields["url"] = url
            fields["category_code"] = fields.get("category_code", "").upper()
            entries.append(Entry(**fields))
    except csv.Error as exc:
        raise ListError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise ListError(f"{name}: empty file (expected a header: {','.join(COLUMNS)})")
    return entries


def filter_categories(entries: list[Entry], categories: Iterable[str] | None, name: str = "") -> list[Entry]:
    """Keep entries whose category is one of ``categories`` (case-insensitive).

    A code that is neither a known Citizen Lab code nor present in the list is
    an error, because it is almost always a typo that would otherwise yield an
    empty, silent run.
    """
    if not categories:
        return entries
    wanted = {c.strip().upper() for c in categories if c.strip()}
    present = {e.category_code for e in entries}
    unknown = sorted(c for c in wanted if c not in CATEGORY_CODES and c not in present)
    if unknown:
        where = f"{name}: " if name else ""
        raise ListError(f"{where}unknown category code {', '.join(repr(c) for c in unknown)} "
                        f"(known: {', '.join(sorted(CATEGORY_CODES))})")
    return [e for e in entries if e.category_code in wanted]


def load_list(path: str | os.PathLike, categories: Iterable[str] | None = None) -> list[Entry]:
    """Load a Citizen Lab format CSV file, optionally keeping only some categories."""
    path = Path(path)
    return filter_categories(parse_csv(_read_text(path), path.name), categories, path.name)


def load_input_file(path: str | os.PathLike) -> list[Entry]:
    """One URL per line; blank lines and ``#`` comments (whole line or after a space) ignored."""
    path = Path(path)
    entries: list[Entry] = []
    seen: set[str] = set()
    for number, raw in enumerate(_read_text(path).splitlines(), 1):
        # " #" starts a comment; a '#' inside a URL (fragment) is never preceded by a space.
        text = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not text:
            continue
        problem = check_url(text)
        if problem:
            raise ListError(f"{path.name}:{number}: {problem}")
        key = _dedup_key(text)
        if key not in seen:
            seen.add(key)
            entries.append(Entry(url=text, source=path.name))
    return entries


def entries_from_urls(urls: Iterable[str]) -> list[Entry]:
    """Entries for URLs given on the command line (``--url``), checked the same way."""
    entries: list[Entry] = []
    seen: set[str] = set()
    for url in urls:
        url = url.strip()
        problem = check_url(url)
        if problem:
            raise ListError(problem)
        if _dedup_key(url) not in seen:
            seen.add(_dedup_key(url))
            entries.append(Entry(url=url, source="command line"))
    return entries


# --------------------------------------------------------------------------
# Named lists


def cache_dir() -> Path:
    return paths.cache_dir() / "test-lists"


def is_downloadable_name(name: str) -> bool:
    low = name.lower()
    return low in REGIONAL_LISTS or bool(re.fullmatch(r"[a-z]{2}", low))


def resolve_list(name: str) -> Path:
    """Map a list name to a file.

    "default" and "high-risk" → the lists shipped with Vantage; "global",
    "cis" or a two-letter country code → the copy downloaded by `vantage
    lists update`; anything else is a path.
    """
    if name in BUNDLED_LISTS:
        return BUNDLED_LISTS[name]
    if is_downloadable_name(name):
        low = name.lower()
        path = cache_dir() / f"{low}.csv"
        if path.is_file():
            return path
        hint = "vantage lists update" if low == "global" else f"vantage lists update --country {low.upper()}"
        if low == "cis":
            hint = "vantage lists update --country cis"
        raise ListError(f"the {low} test list is not downloaded yet: run `{hint}` first")
    path = Path(name).expanduser()
    if not path.exists():
        raise ListError(f"no test list named '{name}' and no such file "
                        "(names: default, high-risk, global, a two-letter country code, or a path)")
    return path


def load_named(name: str, categories: Iterable[str] | None = None) -> list[Entry]:
    """``resolve_list`` + ``load_list``: what `--list NAME` means."""
    return load_list(resolve_list(name), categories)
