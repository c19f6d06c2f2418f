"""Render the report's context as index.html and report.md, and the charts as SVG files.

HTML: Jinja2 with ``autoescape=True``: every value from the database (URLs,
titles, headers, fingerprint names, ASNs, categories) is escaped; the only
markup let through unescaped is matplotlib's own SVG output (``Markup``).
Links are made only for http(s) URLs (``is_http_url``).

Markdown: a finalizer escapes every value for Markdown *and* HTML (Markdown
renderers pass raw HTML through), so no measured string can become a link,
an image, a heading or a tag.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def is_http_url(value: Any) -> bool:
    """True for an absolute http(s) URL with a host and nothing a browser
    would reinterpret (controls, spaces, quotes, backslashes)."""
    if not isinstance(value, str) or _CONTROL.search(value) or any(c in value for c in " \"'<>\\`"):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def md_escape(value: Any) -> str:
    """``value`` as Markdown text that renders literally: HTML specials as
    entities, Markdown punctuation and `$` (TeX in math-enabled renderers)
    backslash-escaped, one line."""
    if value is None:
        return ""
    if isinstance(value, Markup):  # our own markup (none in the Markdown today)
        return str(value)
    text = _CONTROL.sub(" ", str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{float(value) * 100:.{digits}f}%"


def _num(value: Any) -> str:
    return "–" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:,.1f}")


def _environment(autoescape: bool) -> Environment:
    env = Environment(loader=PackageLoader("analysis.report", "templates"), autoescape=autoescape,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                      finalize=None if autoescape else md_escape)
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    env.tests["http_url"] = is_http_url
    return env


def write(out: Path, context: dict[str, Any]) -> list[str]:
    written = []
    for name, svg in context["charts"].items():
        if svg is None:
            (out / f"{name}.svg").unlink(missing_ok=True)  # a chart of an earlier report in the same folder
            continue
        (out / f"{name}.svg").write_text('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + svg, encoding="utf-8")
        written.append(f"{name}.svg")
    html_context = dict(context, charts={k: v and Markup(v) for k, v in context["charts"].items()})
    html = _environment(True).get_template("report.html.j2").render(**html_context)
    (out / "index.html").write_text(html, encoding="utf-8")
    md = _environment(False).get_template("report.md.j2").render(**context)
    (out / "report.md").write_text(md, encoding="utf-8")
    return written + ["index.html", "report.md"]
