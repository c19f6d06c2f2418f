"""Throttling detection sweep in the censorship lab (root only).

What it answers (docs/throttling.md): the smallest slowdown the throttling
test detects reliably, its false positives, and its cost in seconds per URL.

One lab, one run of `vantage run throttling`, many sites:

- every site is served at the same "unthrottled" rate ``--base-kbit`` (LAB.md
  ``behaviour = "slow"``, server-side pacing: the rate a subscriber would get
  from that server without a censor);
- for each slowdown factor k, ``--per-factor`` sites additionally get a censor
  ``throttle`` rule at base/k (SNI/Host-triggered shaping, lab/censor.py);
- ``--unthrottled`` more sites get no censor rule: half at the base rate, half
  unpaced (fast), all expected ``ok`` — the false-positive pool;
- pages are big enough (``--size``) that every download is time-bound.

All URLs are measured concurrently by the real probe (the runner's default
concurrency), so the test also runs under the cross traffic of the others.
Verdicts come from analysis.throttling.apply_throttling on the probe's DuckDB.

    sudo python bench/throttling_sweep.py                    # default sweep
    sudo python bench/throttling_sweep.py --scenario FILE    # throttling verdicts for a scenario's URLs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "throttling_sweep.json"
FACTORS = (1.5, 2, 3, 5, 10)


def build_scenario(base_kbit: int, factors, per_factor: int, unthrottled: int, size: int) -> tuple[str, dict]:
    """TOML text in the LAB.md format, and {url: (kind, factor)}."""
    lines = ['name = "throttling-sweep"', 'description = "throttle rates x unthrottled sites"', ""]
    plan: dict[str, tuple[str, float | None]] = {}

    def site(domain: str, paced: bool) -> None:
        lines.extend(["[[sites]]", f'domain = "{domain}"', f"size = {size}"])
        if paced:
            lines.extend(['behaviour = "slow"', f"rate_kbit = {base_kbit}"])
        lines.append("")

    for factor in factors:
        for i in range(per_factor):
            domain = f"t{str(factor).replace('.', 'p')}-{i}.example"
            site(domain, True)
            lines.extend(["[[censor]]", 'action = "throttle"', f'domain = "{domain}"',
                          f"rate_kbit = {max(1, round(base_kbit / factor))}", ""])
            lines.extend(["[[expect]]", f'url = "https://{domain}/"', 'status = "throttled"', 'method = "throttle.sni"', ""])
            plan[f"https://{domain}/"] = ("throttled", factor)
    for i in range(unthrottled):
        paced = i % 2 == 0
        domain = f"u{i}-{'paced' if paced else 'fast'}.example"
        site(domain, paced)
        lines.extend(["[[expect]]", f'url = "https://{domain}/"', 'status = "ok"', ""])
        plan[f"https://{domain}/"] = ("paced" if paced else "fast", None)
    return "\n".join(lines), plan


def measure_scenario(path: Path, *, urls: list[str] | None = None, progress=print) -> dict:
    """Build the lab of ``path``, run the throttling test on ``urls`` (default:
    the scenario's throttling-relevant URLs), return verdicts and timings."""
    import duckdb

    from analysis.throttling import apply_throttling
    from lab import plan as lab_plan
    from lab.runner import ScenarioLab
    from lab.scenario import load

    scenario = load(path)
    urls = urls or list(dict.fromkeys(e.url for e in scenario.expect if scenario.needs_throttling_test(e)))
    t_lab = time.monotonic()
    with ScenarioLab(scenario, progress=progress) as slab:
        progress(f"lab up in {time.monotonic() - t_lab:.1f} s; measuring {len(urls)} URLs")
        db = slab.workdir / "sweep.duckdb"
        t0 = time.monotonic()
        rc, message = slab.run_probe("throttling", urls, db, timeout=600)
        wall = time.monotonic() - t0
        if rc != 0:
            raise SystemExit(f"vantage run throttling exited {rc}: {message[-500:]}")
        con = duckdb.connect(str(db))
        try:
            apply_throttling(con, public_networks=[lab_plan.LAB_NETWORK])
            rows = con.execute(
                "SELECT m.input, m.runtime, v.status, v.method, v.confidence, v.evidence, m.control_failure "
                "FROM verdicts v JOIN measurements m USING (measurement_id) WHERE m.test_name = 'throttling'"
            ).fetchall()
        finally:
            con.close()
    out = {}
    for url, runtime, status, method, confidence, evidence, control_failure in rows:
        ev = json.loads(evidence)
        out[url] = {
            "status": status, "method": method, "confidence": confidence, "runtime": round(runtime, 2),
            "ratio": ev.get("ratio"), "p": (ev.get("ks") or {}).get("p"), "rule": ev.get("rule"),
            "target_kbit": ev["target"]["median_kbit"], "scrambled_kbit": ev["scrambled"]["median_kbit"],
            "helper_kbit": (ev.get("helper") or {}).get("median_kbit"), "control_failure": control_failure,
            "reason": ev.get("reason"),
        }
    return {"urls": out, "wall_seconds": round(wall, 1)}


def summarise(plan: dict, runs: list[dict], base_kbit: int) -> dict:
    by_factor: dict[float, list[dict]] = {}
    false_positives, unthrottled = [], 0
    runtimes = []
    for run in runs:
        for url, (kind, factor) in plan.items():
            got = run["urls"].get(url)
            if got is None:
                continue
            runtimes.append(got["runtime"])
            if kind == "throttled":
                by_factor.setdefault(factor, []).append(got)
            else:
                unthrottled += 1
                if got["status"] != "ok":
                    false_positives.append({"url": url, **got})
    rows = []
    for factor in sorted(by_factor):
        results = by_factor[factor]
        detected = sum(1 for r in results if r["status"] == "throttled" and r["method"] == "throttle.sni")
        ratios = [r["ratio"] for r in results if r["ratio"] is not None]
        rows.append({
            "slowdown": factor, "throttle_kbit": round(base_kbit / factor), "sites": len(results),
            "detected": detected, "rate": round(detected / len(results), 3) if results else None,
            "inconclusive": sum(1 for r in results if r["status"] == "inconclusive"),
            "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        })
    reliable = [r["slowdown"] for r in rows if r["rate"] is not None and r["rate"] >= 0.95]
    # "Smallest slowdown detected reliably": the smallest factor from which every
    # larger factor is detected too (a monotone threshold, not a lucky point).
    smallest = None
    for r in reversed(rows):
        if r["rate"] is None or r["rate"] < 0.95:
            break
        smallest = r["slowdown"]
    return {
        "by_slowdown": rows,
        "smallest_reliable_slowdown": smallest,
        "reliable_slowdowns": reliable,
        "unthrottled_sites": unthrottled,
        "false_positives": len(false_positives),
        "false_positive_details": false_positives,
        "seconds_per_url": {
            "median": round(statistics.median(runtimes), 2) if runtimes else None,
            "max": round(max(runtimes), 2) if runtimes else None,
        },
        "wall_seconds_per_run": [r["wall_seconds"] for r in runs],
    }


def markdown(summary: dict, args) -> str:
    lines = [
        f"Sweep: base rate {args.base_kbit} kbit/s, {args.per_factor} throttled sites per slowdown, "
        f"{args.unthrottled} unthrottled sites, {args.repeat} run(s), pages of {args.size} bytes.",
        "",
        "| slowdown | throttle (kbit/s) | detected | inconclusive | median measured ratio |",
        "|---|---|---|---|---|",
    ]
    for r in summary["by_slowdown"]:
        lines.append(f"| {r['slowdown']}x | {r['throttle_kbit']} | {r['detected']}/{r['sites']} | "
                     f"{r['inconclusive']} | {r['median_ratio']} |")
    lines += [
        "",
        f"- smallest slowdown detected reliably (>= 95% from there up): **{summary['smallest_reliable_slowdown']}x**",
        f"- false positives: **{summary['false_positives']} / {summary['unthrottled_sites']}** unthrottled sites",
        f"- seconds per URL (measurement runtime): median {summary['seconds_per_url']['median']}, "
        f"max {summary['seconds_per_url']['max']}",
    ]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as the results file records it: relative to the repository when
    inside it, so the file names no machine's directories."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-kbit", type=int, default=4000, help="unthrottled rate of every paced site")
    parser.add_argument("--factors", type=float, nargs="+", default=list(FACTORS), help="slowdown factors")
    parser.add_argument("--per-factor", type=int, default=4, help="throttled sites per factor")
    parser.add_argument("--unthrottled", type=int, default=20, help="sites without a censor rule")
    parser.add_argument("--size", type=int, default=4_000_000, help="page size in bytes")
    parser.add_argument("--repeat", type=int, default=1, help="independent lab runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--scenario", type=Path, help="instead: measure this scenario's throttling URLs and print verdicts")
    args = parser.parse_args(argv)

    if args.scenario:
        result = measure_scenario(args.scenario, progress=lambda m: print(f"· {m}", file=sys.stderr))
        print(json.dumps(result, indent=1))
        return 0

    factors = [int(f) if float(f).is_integer() else f for f in args.factors]
    text, plan = build_scenario(args.base_kbit, factors, args.per_factor, args.unthrottled, args.size)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "throttling-sweep.toml"
        path.write_text(text)
        for i in range(args.repeat):
            print(f"· run {i + 1}/{args.repeat}", file=sys.stderr)
            runs.append(measure_scenario(path, urls=list(plan), progress=lambda m: print(f"· {m}", file=sys.stderr)))
    summary = summarise(plan, runs, args.base_kbit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "parameters": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary, "runs": runs,
    }, indent=1))
    print(markdown(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
