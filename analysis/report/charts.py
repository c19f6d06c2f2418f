"""The report's charts, drawn by matplotlib's SVG backend (no hand-built SVG).

Each function takes aggregates (already computed in DuckDB) and returns the
SVG text. Text is drawn as paths (``svg.fonttype = 'path'``): the SVG needs no
font and shows alike everywhere; matplotlib escapes every label it writes.
Charts only show what has enough data behind it; the callers leave out the
rest and say so in the text.
"""

from __future__ import annotations

import datetime as dt
import io
import functools
import re
from collections import defaultdict
from typing import Any, Callable, Iterable

from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
import matplotlib

# One colour per method family, readable in grey when printed.
FAMILY_COLOURS = {"dns": "#1b9e77", "tcp": "#d95f02", "tls": "#7570b3", "http": "#e7298a", "throttling": "#66a61e"}
_PROLOGUE = re.compile(r"\A.*?(?=<svg)", re.S)


def _svg(fig: Figure, name: str) -> str:
    """The figure as SVG text without the XML prologue (so it can be inlined),
    ids salted with the chart's name (several charts share one page)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": name}):
        FigureCanvasSVG(fig).print_svg(buffer, metadata={"Date": None, "Creator": None})
    return _PROLOGUE.sub("", buffer.getvalue(), count=1)


def _plain_text(chart: Callable[..., str]) -> Callable[..., str]:
    """Draw ``chart`` with mathtext off: labels are network text (domains,
    ASNs, categories), and a ``$`` in one must be drawn as a ``$``, not parsed
    as TeX (which fails, or draws something else). Text objects read the
    setting when they are created, so it covers the whole chart function."""
    @functools.wraps(chart)
    def draw(*args: Any, **kwargs: Any) -> str:
        with matplotlib.rc_context({"text.parse_math": False}):
            return chart(*args, **kwargs)
    return draw


def _label(text: Any, width: int = 28) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


@_plain_text
def timeline(points: Iterable[dict[str, Any]], changes: Iterable[dict[str, Any]], networks: list[str]) -> str:
    """Anomaly rate per day, one line per network (``networks``, in order);
    days with too little data (``charted`` false) are gaps, not points.
    Change points of sites on a network are marked on its line: ▲ blocking
    started, ▼ stopped."""
    series: dict[str, list[tuple[dt.date, float | None]]] = defaultdict(list)
    for p in points:
        if p["asn"] in networks:
            series[p["asn"]].append((p["day"], float(p["anomaly_rate"]) if p["charted"] and p["anomaly_rate"] is not None else None))
    fig = Figure(figsize=(8, 3.6), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"].colors
    rate_at: dict[tuple[str, dt.date], float] = {}
    for i, asn in enumerate(networks):
        days = sorted(series.get(asn, []), key=lambda p: p[0])
        xs = [d for d, _ in days]
        ys = [float("nan") if v is None else v * 100 for _, v in days]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[i % 10], label=_label(asn))
        rate_at.update({(asn, d): y for d, y in zip(xs, ys)})
    for kind, marker in (("started", "^"), ("stopped", "v")):
        xs, ys, cs = [], [], []
        for c in changes:
            if c["change"] == kind and c["asn"] in networks:
                y = rate_at.get((c["asn"], c["day"]))
                if y is not None and y == y:
                    xs.append(c["day"])
                    ys.append(y)
                    cs.append(colours[networks.index(c["asn"]) % 10])
        if xs:
            ax.scatter(xs, ys, marker=marker, s=70, c=cs, edgecolors="black", linewidths=0.8, zorder=3,
                       label=f"a site's blocking {kind}")
    ax.set_ylim(-2, 102)
    ax.set_ylabel("blocked or throttled (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.autofmt_xdate()
    return _svg(fig, "timeline")


@_plain_text
def methods(shares: list[dict[str, Any]]) -> str:
    """Horizontal stacked bars: for each network, the share of its usable
    measurements blocked or throttled by each method family."""
    fig = Figure(figsize=(8, 0.9 + 0.45 * max(1, len(shares))), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    labels = [_label(s["asn"]) for s in shares]
    left = [0.0] * len(shares)
    for family, colour in FAMILY_COLOURS.items():
        values = [100.0 * s[family] / s["usable"] if s["usable"] else 0.0 for s in shares]
        ax.barh(labels, values, left=left, color=colour, label=family.upper() if family != "throttling" else "throttling",
                edgecolor="white", linewidth=0.5)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("share of usable measurements (%)")
    ax.set_xlim(0, max(5.0, max(left or [0.0]) * 1.1))
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncols=5, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    return _svg(fig, "methods")


@_plain_text
def throttling(rows: list[dict[str, Any]]) -> str:
    """Median throughput of the target vs its reference, per finding."""
    fig = Figure(figsize=(8, 0.9 + 0.45 * max(1, len(rows))), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    labels = [_label(f"{r['domain']} · {r['asn']}", 40) for r in rows]
    positions = list(range(len(rows)))
    reference = [float(r["scrambled_kbit"] if r["method"] == "throttle.sni" and r["scrambled_kbit"] is not None
                       else (r["control_kbit"] or r["scrambled_kbit"] or 0)) for r in rows]
    target = [float(r["target_kbit"] or 0) for r in rows]
    ax.barh([p - 0.2 for p in positions], reference, height=0.4, color="#999999", label="reference (median kbit/s)")
    ax.barh([p + 0.2 for p in positions], target, height=0.4, color=FAMILY_COLOURS["throttling"], label="this site (median kbit/s)")
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.set_xlabel("kbit/s")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncols=2, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    return _svg(fig, "throttling")
