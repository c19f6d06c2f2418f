"""Build a scenario's lab, run the real probe against it, analyze and score.

    ScenarioLab(scenario)   namespaces + PKI + DNS servers + sites + censor + helper
    run_scenario(path)      ScenarioLab, then `vantage run web|throttling` in the
                            probe namespace, analysis.engine.analyze, score (LAB.md)

Nothing here emulates censorship itself except the ISP resolver's rules (in
lab/dnsservers.py); on-path actions are lab/censor.py's real packet processing.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import geodb, plan
from .dnsservers import Rule, Zone, config_for as dns_config
from .pki import CA
from .scenario import RESOLVER_ACTIONS, Expectation, Scenario, load
from .sites import assign_addresses, config_for as sites_config
from .topology import Lab, LabError, check_prerequisites, in_netns

VANTAGE = [sys.executable, "-m", "cli.main"]
PROBE_CC, PROBE_ASN = "ZZ", "AS0"
# Actions the ISP resolver applies; dns-drop also goes to the censor (on the wire).
RESOLVER_ONLY = {"dns-nxdomain", "dns-redirect"}
FLAKY_MARK = 0x7602  # connmark of a flaky site's connection that is being dropped


def flaky_rules(scenario: Scenario, addresses: dict[str, list[str]], control: dict[str, list[str]], version: int) -> str:
    """iptables-restore input for the internet namespace: a flaky site drops
    the share ``loss`` of new connections, for everyone. The decision is taken
    on a connection's first SYN (statistic match) and kept in its conntrack
    mark, and the site's answers on a marked connection are dropped, so SYN
    retransmissions meet the same fate and the connect times out, as on a
    lossy path that lost the connection. (Dropping the SYN itself would not
    do: a dropped packet leaves no conntrack entry, so every retransmission
    would draw again and the connect would only be delayed.)"""
    lines = ["*mangle"]
    for site in scenario.sites:
        if site.behaviour != "flaky" or not site.loss:
            continue
        for a in addresses.get(site.domain, []) + control.get(site.domain, []):
            if (":" in a) == (version == 6):
                lines.append(f"-A PREROUTING -d {a} -p tcp --syn -m conntrack --ctstate NEW "
                             f"-m statistic --mode random --probability {site.loss:.4f} -j CONNMARK --set-mark {FLAKY_MARK:#x}")
    if len(lines) == 1:
        return ""
    lines += ["COMMIT", "*filter", f"-A OUTPUT -m connmark --mark {FLAKY_MARK:#x} -j DROP", "COMMIT"]
    return "\n".join(lines) + "\n"


def _say(progress, message: str) -> None:
    if progress:
        progress(message)


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ScenarioLab:
    """A running lab for one scenario. Use as a context manager."""

    scenario: Scenario
    with_censor: bool = True
    with_helper: bool = True
    progress: object = None
    lab: Lab = field(default_factory=Lab)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    control_addresses: dict[str, list[str]] = field(default_factory=dict)
    ca: CA | None = None
    rogue_ca: CA | None = None
    censor: object = None
    helper_running: bool = False
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    geo_dir: Path | None = None

    def __post_init__(self) -> None:
        self.lab.ipv6 = self.scenario.needs_ipv6
        self.lab.probe_ipv6 = self.scenario.probe_ipv6
        self.lab.hops = self.scenario.hops

    def __enter__(self) -> "ScenarioLab":
        self.lab.__enter__()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def workdir(self) -> Path:
        assert self.lab.workdir is not None
        return self.lab.workdir

    def ns(self, role: str) -> str:
        return self.lab.ns(role)

    def _timed(self, key: str, t0: float) -> None:
        self.timings[key] = round(time.monotonic() - t0, 3)

    def start(self) -> None:
        sc = self.scenario
        t0 = time.monotonic()
        if sc.needs_ipv6 or any(s.behaviour == "flaky" and s.ipv6 for s in sc.sites):
            check_prerequisites(("ip6tables", "ip6tables-restore"))
        self.lab.extra = {"scenario": sc.name, "scenario_path": str(sc.path) if sc.path else None}
        self.lab.save_state()
        pki = self.workdir / "pki"
        self.ca = CA.create("lab", pki, "Vantage lab root")
        self.rogue_ca = CA.create("rogue", pki, "Censor interception root")
        certs = {s.domain: self.ca.issue([s.domain], pki / "sites") for s in sc.sites}
        self.addresses, self.control_addresses = assign_addresses(sc)
        every = [ip for ips in self.addresses.values() for ip in ips] + [ip for ips in self.control_addresses.values() for ip in ips]
        self.lab.add_internet_addresses(every)
        self._flaky()
        self.geo_dir = geodb.write(self.workdir / "geo", self.addresses, self.control_addresses, {s.domain for s in sc.sites if s.cdn})
        self._timed("topology", t0)

        t1 = time.monotonic()
        zone = Zone(self.addresses, self.control_addresses)
        rules = [Rule(r.action, r.domain, r.answer, r.family) for r in sc.censor if r.action in RESOLVER_ACTIONS and r.domain]
        dns_file = self.workdir / "dns.json"
        dns_file.write_text(json.dumps(dns_config(zone, rules)))
        for role in ("internet", "isp", "control"):
            self.lab.spawn(role, [sys.executable, "-m", "lab.dnsservers", str(dns_file), role], f"dns-{role}")
        sites_file = self.workdir / "sites.json"
        sites_file.write_text(json.dumps(sites_config(sc, self.addresses, self.control_addresses, certs)))
        self.lab.spawn("internet", [sys.executable, "-m", "lab.sites", str(sites_file)], "sites")
        self._timed("servers", t1)

        if self.with_censor:
            t2 = time.monotonic()
            self._start_censor()
            self._timed("censor", t2)
        if self.with_helper:
            t3 = time.monotonic()
            self._start_helper()
            self._timed("helper", t3)
        self.lab.extra["env"] = self.probe_env()
        self.lab.save_state()

    def _flaky(self) -> None:
        for version, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
            rules = flaky_rules(self.scenario, self.addresses, self.control_addresses, version)
            if not rules:
                continue
            proc = self.lab.run("internet", [tool, "-w", "--noflush"], input=rules)
            if proc.returncode != 0:
                raise LabError(f"flaky sites: {tool} failed in the internet namespace: {(proc.stderr or proc.stdout).strip()}")

    def _start_censor(self) -> None:
        on_path = [r for r in self.scenario.censor if r.action not in RESOLVER_ONLY]
        if not on_path:
            return
        try:
            from .censor import Censor
        except ImportError as exc:
            raise LabError(f"the scenario needs on-path censor actions but lab.censor cannot be imported: {exc}") from None
        site_addresses = {d: ips + self.control_addresses.get(d, []) for d, ips in self.addresses.items()}
        self.censor = Censor(ns=self.ns("censor"), rules=on_path, site_addresses=site_addresses, workdir=self.workdir / "censor", rogue_ca=self.rogue_ca,
                             ipv6=self.scenario.needs_ipv6 or any(":" in (r.ip or "") for r in on_path))
        (self.workdir / "censor").mkdir(exist_ok=True)
        _say(self.progress, f"censor: {len(on_path)} on-path rule(s)")
        try:
            self.censor.start()
        except Exception as exc:
            # CensorError or an iptables failure: the scenario cannot run as written.
            raise LabError(f"the censor did not start: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None

    def _start_helper(self) -> None:
        argv = [*VANTAGE, "helper", "serve", "--listen", f"{plan.CONTROL_ADDRESS}:{plan.HELPER_PORT}",
                "--ca-file", str(self.ca.cert_path), "--resolver", plan.CONTROL_RESOLVER]
        for network in plan.PUBLIC_NETWORKS:
            argv += ["--allow", network]
        if self.geo_dir is not None:
            argv += ["--asn-db", str(self.geo_dir)]
        proc = self.lab.spawn("control", argv, "helper", ready=False, env=self._child_env())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                tail = proc.log.read_text(errors="replace").strip().splitlines()[-1:] if proc.log else []
                raise LabError(f"the helper exited in the control namespace: {tail[0] if tail else proc.popen.returncode}")
            if in_netns(self.ns("control"), _port_open, plan.CONTROL_ADDRESS, plan.HELPER_PORT):
                self.helper_running = True
                return
            time.sleep(0.1)
        raise LabError(f"the helper did not listen on {plan.CONTROL_ADDRESS}:{plan.HELPER_PORT} within 20 s (see {proc.log})")

    def _child_env(self) -> dict:
        env = dict(os.environ)
        # A throw-away config so the researcher's own settings never leak into the lab.
        env["VANTAGE_CONFIG"] = str(self.workdir / "vantage.toml")
        env["XDG_CACHE_HOME"] = str(self.workdir / "cache")
        if self.geo_dir is not None:
            env["VANTAGE_GEO_DB"] = str(self.geo_dir)
        return env

    def probe_env(self) -> dict[str, str]:
        """VANTAGE_* settings that make a plain `vantage run` use this lab."""
        env = {
            "VANTAGE_CONFIG": str(self.workdir / "vantage.toml"),
            "VANTAGE_DB": str(self.workdir / "shell.duckdb"),
            "VANTAGE_RESOLVER": plan.PUBLIC_RESOLVER,
            "VANTAGE_EXTRA_CA_FILE": str(self.ca.cert_path) if self.ca else "",
            "VANTAGE_PROBE_CC": PROBE_CC,
            "VANTAGE_PROBE_ASN": PROBE_ASN,
            "VANTAGE_LAB": self.lab.prefix,
        }
        if self.geo_dir is not None:
            env["VANTAGE_GEO_DB"] = str(self.geo_dir)
        if self.helper_running:
            env["VANTAGE_HELPERS"] = plan.HELPER_URL
        return env

    def stop(self) -> None:
        if self.censor is not None:
            try:
                self.censor.stop()
            except Exception as exc:  # teardown must go on: the namespaces still have to go
                print(f"vantage lab: censor stop failed: {exc}", file=sys.stderr)
            self.censor = None
        self.lab.down()

    # --- the probe -----------------------------------------------------------------

    def run_probe(self, test: str, urls: list[str], db: Path, timeout: float = 240.0) -> tuple[int, str]:
        argv = [*VANTAGE, "run", test, "--yes", "--quiet", "--db", str(db), "--ca-file", str(self.ca.cert_path),
                "--resolver", plan.PUBLIC_RESOLVER, "--no-doh",
                "--probe-cc", PROBE_CC, "--probe-asn", PROBE_ASN]
        for network in plan.PUBLIC_NETWORKS:
            argv += ["--public-network", network]
        if self.helper_running:
            argv += ["--helper", plan.HELPER_URL]
        for u in urls:
            argv += ["--url", u]
        env = self._child_env()
        env["VANTAGE_DB"] = str(db)
        proc = self.lab.run("probe", argv, timeout=timeout, env=env)
        (self.workdir / f"probe-{test}.log").write_text(proc.stdout + proc.stderr)
        return proc.returncode, (proc.stderr or proc.stdout).strip()


# --- scoring ------------------------------------------------------------------------

def _norm(url: str) -> str:
    p = urlsplit(url.strip())
    return f"{p.scheme.lower()}://{(p.hostname or '').lower()}{p.path or '/'}"


def read_verdicts(db: Path) -> dict[str, dict[str, dict]]:
    """{normalized input: {test_name: verdict}} from the analyzed database."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'verdicts'").fetchall()}
        wanted = [c for c in ("status", "layer", "method", "confidence", "confirmed") if c in cols]
        sel = ", ".join(f"v.{c}" for c in wanted)
        rows = con.execute(
            f"SELECT m.input, m.test_name, m.start_time, {sel} FROM verdicts v JOIN measurements m USING (measurement_id) ORDER BY m.start_time"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        url, test = row[0], row[1]
        verdict = dict(zip(wanted, row[3:]))
        out.setdefault(_norm(url or ""), {})[test] = verdict  # the latest measurement wins
    return out


def combine(verdicts: dict[str, dict]) -> dict | None:
    """One verdict per URL from the web connectivity and throttling tests.

    Web connectivity decides, except that a throttling finding overrides an
    'ok'/'inconclusive' web verdict: only the dedicated test can see a slow
    but working path."""
    web = verdicts.get("web_connectivity")
    thr = next((v for t, v in verdicts.items() if t.startswith("throttl")), None)
    if thr and thr.get("status") == "throttled" and (web is None or web.get("status") in ("ok", "inconclusive")):
        return thr
    return web or thr or (next(iter(verdicts.values())) if verdicts else None)


def score(scenario: Scenario, verdicts: dict[str, dict[str, dict]], seconds: float) -> dict:
    results = []
    for exp in scenario.expect:
        got = combine(verdicts.get(_norm(exp.url), {}))
        results.append(_score_one(exp, got))
    correct = sum(1 for r in results if r["correct"])
    return {"scenario": scenario.name, "results": results, "correct": correct, "total": len(results), "seconds": round(seconds, 1)}


def _score_one(exp: Expectation, got: dict | None) -> dict:
    expected = {"status": exp.status}
    if exp.layer is not None:
        expected["layer"] = exp.layer
    if exp.method is not None:
        expected["method"] = exp.method
    if got is None:
        return {"url": exp.url, "expected": expected, "got": None, "correct": False}
    g = {"status": got.get("status"), "layer": got.get("layer"), "method": got.get("method")}
    if got.get("confidence") is not None:
        g["confidence"] = round(float(got["confidence"]), 3)
    ok = g["status"] == exp.status
    ok = ok and (exp.layer is None or g["layer"] == exp.layer)
    ok = ok and (exp.method is None or g["method"] == exp.method)
    return {"url": exp.url, "expected": expected, "got": g, "correct": ok}


def run_scenario(path: Path | str, progress=None, *, keep: bool = False) -> dict:
    """Run one scenario end to end; returns the scored result (LAB.md).

    Raises ScenarioError / LabError when it cannot run. Problems after the lab
    is up (the probe failed, the analysis raised) are reported in ``errors``
    and the expectations score as not met: the score is printed regardless."""
    scenario = load(path)
    start = time.monotonic()
    errors: list[str] = []
    verdicts: dict = {}
    with ScenarioLab(scenario, progress=progress) as slab:
        _say(progress, f"lab {slab.lab.prefix} up in {time.monotonic() - start:.1f}s")
        errors.extend(slab.notes)
        db = slab.workdir / "probe.duckdb"
        urls = [e.url for e in scenario.expect]
        urls = list(dict.fromkeys(urls))
        t = time.monotonic()
        rc, msg = slab.run_probe("web", urls, db)
        slab.timings["probe_web"] = round(time.monotonic() - t, 1)
        if rc != 0:
            errors.append(f"vantage run web exited {rc}: {msg.splitlines()[-1] if msg else ''}")
        throttled = list(dict.fromkeys(e.url for e in scenario.expect if scenario.needs_throttling_test(e)))
        if throttled:
            t = time.monotonic()
            rc, msg = slab.run_probe("throttling", throttled, db)
            slab.timings["probe_throttling"] = round(time.monotonic() - t, 1)
            if rc != 0:
                errors.append(f"vantage run throttling exited {rc}: {msg.splitlines()[-1] if msg else ''}")
        _say(progress, "analyzing")
        t = time.monotonic()
        if db.exists():
            try:
                verdicts = analyze_db(db, slab.geo_dir)
            except Exception as exc:
                errors.append(f"analysis failed: {type(exc).__name__}: {exc}")
        else:
            errors.append("the probe wrote no database")
        slab.timings["analysis"] = round(time.monotonic() - t, 1)
        timings = dict(slab.timings)
        if keep:
            os.environ["VANTAGE_LAB_KEEP"] = "1"
            errors.append(f"work directory kept: {slab.workdir}")
    result = score(scenario, verdicts, time.monotonic() - start)
    result["timings"] = timings
    if keep:
        result["database"] = str(db)
    if errors:
        result["errors"] = errors
    return result


def analyze_db(db: Path, geo_dir: Path | None = None) -> dict[str, dict[str, dict]]:
    import duckdb

    from analysis.engine import analyze

    kwargs = {}
    if geo_dir is not None:
        # The lab's IP-to-ASN database, under whichever name the analysis takes it.
        names = inspect.signature(analyze).parameters
        for name in ("geo_db", "geo_dir", "asn_db"):
            if name in names:
                kwargs[name] = geo_dir
                break
    con = duckdb.connect(str(db))
    try:
        analyze(con, public_networks=list(plan.PUBLIC_NETWORKS), **kwargs)
    finally:
        con.close()
    return read_verdicts(db)
