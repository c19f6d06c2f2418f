"""Strict parser for lab scenario files (the TOML format fixed in LAB.md).

A scenario describes the sites of a small emulated internet, what the censor
does, and the verdict each URL should get. The parser is deliberately strict:
a misspelt key silently ignored would make a scenario test something else than
its author thinks, so every unknown key, wrong type, unknown action or
behaviour is a ``ScenarioError`` naming the file, the line and the key.

``tomllib`` does not report line numbers, so we recover them by scanning the
text: the N-th ``[[sites]]`` header in the text is the N-th element of the
parsed ``sites`` array, and a key's line is the first ``key =`` line between
that header and the next table header.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import VantageError

BEHAVIOURS = ("normal", "down", "dynamic", "slow", "server-block", "redirect", "flaky")
ACTIONS = (
    "dns-nxdomain",
    "dns-redirect",
    "dns-inject",
    "dns-drop",
    "ip-blackhole",
    "ip-reject",
    "http-reset",
    "http-blockpage",
    "tls-reset",
    "tls-drop",
    "tls-mitm",
    "throttle",
)
# Actions the ISP resolver applies itself (lab/dnsservers.py); the rest are
# on-path actions of lab/censor.py. dns-drop is both: dropped at the resolver
# and on the wire.
RESOLVER_ACTIONS = ("dns-nxdomain", "dns-redirect", "dns-drop")
STATUSES = ("ok", "blocked", "throttled", "down", "server_side", "inconclusive")
LAYERS = ("dns", "tcp", "tls", "http")
BLOCK_FROM = ("probe", "control")
PROBE_IPV6 = ("none", "broken", "working")
FAMILIES = ("ipv4", "ipv6")

DEFAULT_TITLE_SUFFIX = "home page"
DEFAULT_SIZE = 20000
MAX_ADDRESSES = 8
MAX_HOPS = 8  # lab/plan.py MAX_HOPS


class ScenarioError(VantageError):
    """A malformed scenario; the message is one line: ``file:line: what``."""


@dataclass(frozen=True)
class Site:
    domain: str
    behaviour: str = "normal"
    title: str = ""
    size: int = DEFAULT_SIZE
    addresses: int = 1  # number of A records (the TOML key); actual IPs are assigned by lab/sites.py
    geo_dns: bool = False
    redirect_to: str | None = None
    rate_kbit: int | None = None
    block_from: str | None = None
    loss: float | None = None
    ipv6: bool = False
    cdn: bool = False
    line: int = 0


@dataclass(frozen=True)
class CensorRule:
    action: str
    domain: str | None = None
    ip: str | None = None
    answer: str | None = None
    page: str | None = None
    status: int = 200
    rate_kbit: int | None = None
    family: str | None = None  # None: both address families
    line: int = 0


@dataclass(frozen=True)
class Expectation:
    url: str
    status: str
    layer: str | None = None
    method: str | None = None
    line: int = 0


@dataclass
class Scenario:
    name: str
    description: str
    sites: list[Site] = field(default_factory=list)
    censor: list[CensorRule] = field(default_factory=list)
    expect: list[Expectation] = field(default_factory=list)
    path: Path | None = None
    probe_ipv6: str = "none"
    hops: int = 0  # routers between the isp and the censor (LAB.md `hops = N`)

    @property
    def needs_ipv6(self) -> bool:
        """Whether any namespace needs IPv6 (dual-stack sites, or a probe network with IPv6)."""
        return self.probe_ipv6 != "none" or any(s.ipv6 for s in self.sites)

    def site(self, domain: str) -> Site | None:
        for s in self.sites:
            if s.domain == domain:
                return s
        return None

    def rules_for(self, domain: str) -> list[CensorRule]:
        return [r for r in self.censor if r.domain == domain]

    def needs_throttling_test(self, exp: Expectation) -> bool:
        """LAB.md: run the throttling test for a URL expected ``throttled`` or
        whose site or censor rule involves a rate."""
        host = urlsplit(exp.url).hostname or ""
        site = self.site(host)
        if exp.status == "throttled":
            return True
        if site is not None and site.rate_kbit:
            return True
        return any(r.rate_kbit for r in self.rules_for(host))


# --- line recovery --------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?")


class _Lines:
    """Maps (table kind, index, key) to a 1-based line number in the text."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers: list[tuple[str, int]] = []  # (table name, 0-based line index)
        for i, raw in enumerate(self.lines):
            m = _HEADER.match(raw)
            if m and not raw.lstrip().startswith("#"):
                self.headers.append((m.group(1).strip("\"'"), i))

    def _span(self, kind: str | None, index: int) -> tuple[int, int]:
        if kind is None:  # top-level keys live before the first header
            end = self.headers[0][1] if self.headers else len(self.lines)
            return 0, end
        seen = -1
        for pos, (name, start) in enumerate(self.headers):
            if name == kind:
                seen += 1
                if seen == index:
                    end = self.headers[pos + 1][1] if pos + 1 < len(self.headers) else len(self.lines)
                    return start, end
        return 0, len(self.lines)

    def table(self, kind: str, index: int) -> int:
        return self._span(kind, index)[0] + 1

    def key(self, kind: str | None, index: int, key: str) -> int:
        start, end = self._span(kind, index)
        pattern = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*[=.]")
        for i in range(start, end):
            if pattern.match(self.lines[i]):
                return i + 1
        return start + 1


# --- parsing --------------------------------------------------------------------

_TYPES = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}


class _Parser:
    def __init__(self, path: Path, text: str):
        self.path = path
        self.where = _Lines(text)
        self.text = text

    def fail(self, line: int, message: str) -> None:
        raise ScenarioError(f"{self.path.name}:{line}: {message}")

    def take(self, table: dict, kind: str | None, index: int, spec: dict[str, type], required: tuple[str, ...]) -> dict:
        label = f"[[{kind}]]" if kind else "the top level"
        for key in table:
            if key not in spec:
                self.fail(self.where.key(kind, index, key), f"unknown key '{key}' in {label}")
        for key in required:
            if key not in table:
                line = self.where.table(kind, index) if kind else 1
                self.fail(line, f"missing required key '{key}' in {label}")
        out = {}
        for key, value in table.items():
            want = spec[key]
            # bool is a subclass of int in Python: `size = true` must not pass as 1.
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok, value = True, float(value)  # `loss = 1` is a number too
            if not ok:
                self.fail(self.where.key(kind, index, key), f"'{key}' in {label} must be {_TYPES[want]}, not {type(value).__name__}")
            out[key] = value
        return out

    def parse(self) -> Scenario:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            raise ScenarioError(f"{self.path.name}:{m.group(1) if m else 1}: invalid TOML: {exc}") from None
        top_spec = {"name": str, "description": str, "probe_ipv6": str, "hops": int, "sites": list, "censor": list, "expect": list}
        for key in data:
            if key not in top_spec:
                self.fail(self.where.key(None, 0, key) if not isinstance(data[key], dict) else self._header_line(key), f"unknown key '{key}' at the top level")
        for key in ("sites", "censor", "expect"):
            if key in data and (not isinstance(data[key], list) or not all(isinstance(t, dict) for t in data[key])):
                self.fail(self.where.key(None, 0, key), f"'{key}' must be an array of tables ([[{key}]])")
        top = self.take({k: v for k, v in data.items() if k in ("name", "description", "probe_ipv6", "hops")}, None, 0,
                        {"name": str, "description": str, "probe_ipv6": str, "hops": int}, ("name",))
        probe_ipv6 = top.get("probe_ipv6", "none")
        if probe_ipv6 not in PROBE_IPV6:
            self.fail(self.where.key(None, 0, "probe_ipv6"), f"unknown probe_ipv6 '{probe_ipv6}' at the top level (expected one of: {', '.join(PROBE_IPV6)})")
        sites = [self.site(t, i) for i, t in enumerate(data.get("sites", []))]
        domains = {}
        for s in sites:
            if s.domain in domains:
                self.fail(s.line, f"site '{s.domain}' is defined twice (first at line {domains[s.domain]})")
            domains[s.domain] = s.line
        censor = [self.rule(t, i, domains) for i, t in enumerate(data.get("censor", []))]
        expect = [self.expectation(t, i, domains) for i, t in enumerate(data.get("expect", []))]
        if not expect:
            self.fail(1, "no [[expect]] entries: a scenario must say what verdicts it expects")
        for s in sites:
            if s.redirect_to:
                target = urlsplit(s.redirect_to).hostname
                if target not in domains:
                    self.fail(self.where.key("sites", sites.index(s), "redirect_to"), f"redirect_to host '{target}' is not a site of this scenario")
        for r in censor:
            site = next((s for s in sites if s.domain == r.domain), None)
            if r.family == "ipv6" and r.ip is None and site is not None and not site.ipv6 and not r.action.startswith("dns-"):
                self.fail(self.where.key("censor", censor.index(r), "family"), f"family = \"ipv6\" in [[censor]]: site '{r.domain}' has no IPv6 addresses (set ipv6 = true on it)")
        scenario = Scenario(top["name"], top.get("description", ""), sites, censor, expect, self.path, probe_ipv6)
        scenario.hops = self._hops(top, scenario)
        return scenario

    # --- hops = N (routers between the isp and the censor) -------------------------

    def _hops(self, top: dict, scenario: Scenario) -> int:
        hops = top.get("hops", 0)
        if not 0 <= hops <= MAX_HOPS:
            self.fail(self.where.key(None, 0, "hops"), f"'hops' at the top level must be between 0 and {MAX_HOPS}")
        if hops and scenario.needs_ipv6:
            self.fail(self.where.key(None, 0, "hops"), "'hops' needs an IPv4-only scenario (the routers have no IPv6)")
        return hops

    # --- end of hops ----------------------------------------------------------------

    def _header_line(self, key: str) -> int:
        for name, i in self.where.headers:
            if name == key:
                return i + 1
        return 1

    def site(self, table: dict, i: int) -> Site:
        spec = {"domain": str, "behaviour": str, "title": str, "size": int, "addresses": int, "geo_dns": bool, "redirect_to": str,
                "rate_kbit": int, "block_from": str, "loss": float, "ipv6": bool, "cdn": bool}
        t = self.take(table, "sites", i, spec, ("domain",))
        line = self.where.table("sites", i)
        key = lambda k: self.where.key("sites", i, k)  # noqa: E731
        domain = t["domain"].lower().rstrip(".")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)+", domain):
            self.fail(key("domain"), f"'domain' in [[sites]] is not a valid host name: {t['domain']!r}")
        behaviour = t.get("behaviour", "normal")
        if behaviour not in BEHAVIOURS:
            self.fail(key("behaviour"), f"unknown behaviour '{behaviour}' in [[sites]] (expected one of: {', '.join(BEHAVIOURS)})")
        if t.get("size", 1) < 0 or t.get("size", 1) > 50_000_000:
            self.fail(key("size"), "'size' in [[sites]] must be between 0 and 50000000")
        if not 1 <= t.get("addresses", 1) <= MAX_ADDRESSES:
            self.fail(key("addresses"), f"'addresses' in [[sites]] must be between 1 and {MAX_ADDRESSES}")
        if behaviour == "redirect" and "redirect_to" not in t:
            self.fail(line, "behaviour 'redirect' in [[sites]] needs 'redirect_to'")
        if "redirect_to" in t:
            if behaviour != "redirect":
                self.fail(key("redirect_to"), "'redirect_to' in [[sites]] is only valid with behaviour = \"redirect\"")
            if urlsplit(t["redirect_to"]).scheme not in ("http", "https"):
                self.fail(key("redirect_to"), "'redirect_to' in [[sites]] must be an http(s) URL")
        if behaviour == "slow" and "rate_kbit" not in t:
            self.fail(line, "behaviour 'slow' in [[sites]] needs 'rate_kbit'")
        if "rate_kbit" in t:
            if behaviour != "slow":
                self.fail(key("rate_kbit"), "'rate_kbit' in [[sites]] is only valid with behaviour = \"slow\"")
            if t["rate_kbit"] <= 0:
                self.fail(key("rate_kbit"), "'rate_kbit' in [[sites]] must be positive")
        block_from = t.get("block_from")
        if block_from is not None:
            if behaviour != "server-block":
                self.fail(key("block_from"), "'block_from' in [[sites]] is only valid with behaviour = \"server-block\"")
            if block_from not in BLOCK_FROM:
                self.fail(key("block_from"), f"unknown block_from '{block_from}' in [[sites]] (expected: {', '.join(BLOCK_FROM)})")
        if behaviour == "server-block":
            block_from = block_from or "probe"
        if behaviour == "flaky" and "loss" not in t:
            self.fail(line, "behaviour 'flaky' in [[sites]] needs 'loss'")
        if "loss" in t:
            if behaviour != "flaky":
                self.fail(key("loss"), "'loss' in [[sites]] is only valid with behaviour = \"flaky\"")
            if not 0 < t["loss"] < 1:
                self.fail(key("loss"), "'loss' in [[sites]] must be a share between 0 and 1 (exclusive), e.g. 0.3")
        if t.get("cdn"):
            if t.get("addresses", 1) < 2:
                self.fail(key("cdn"), "'cdn' in [[sites]] needs 'addresses' of 2 or more")
            if t.get("geo_dns"):
                self.fail(key("cdn"), "'cdn' and 'geo_dns' in [[sites]] exclude each other (a CDN site already answers per side)")
        title = t.get("title") or f"{domain} {DEFAULT_TITLE_SUFFIX}"
        return Site(domain, behaviour, title, t.get("size", DEFAULT_SIZE), t.get("addresses", 1), t.get("geo_dns", False), t.get("redirect_to"),
                    t.get("rate_kbit"), block_from, t.get("loss"), t.get("ipv6", False), t.get("cdn", False), line)

    def rule(self, table: dict, i: int, domains: dict) -> CensorRule:
        spec = {"action": str, "domain": str, "ip": str, "answer": str, "page": str, "status": int, "rate_kbit": int, "family": str}
        t = self.take(table, "censor", i, spec, ("action",))
        line = self.where.table("censor", i)
        key = lambda k: self.where.key("censor", i, k)  # noqa: E731
        action = t["action"]
        if action not in ACTIONS:
            self.fail(key("action"), f"unknown action '{action}' in [[censor]] (expected one of: {', '.join(ACTIONS)})")
        domain = t["domain"].lower().rstrip(".") if "domain" in t else None
        ip = t.get("ip")
        if domain is None and ip is None:
            self.fail(line, f"[[censor]] action '{action}' needs 'domain' or 'ip'")
        if domain is not None and ip is not None:
            self.fail(key("ip"), "[[censor]] takes 'domain' or 'ip', not both")
        if ip is not None:
            try:
                ipaddress.ip_network(ip, strict=False)
            except ValueError:
                self.fail(key("ip"), f"'ip' in [[censor]] is not an address or network: {ip!r}")
            if action.startswith("dns-"):
                self.fail(key("ip"), f"action '{action}' matches DNS names: use 'domain', not 'ip'")
        if domain is not None and domain not in domains and action not in ("dns-nxdomain", "dns-redirect", "dns-inject", "dns-drop"):
            # IP-level actions need the site's addresses; a name that is no site has none.
            self.fail(key("domain"), f"[[censor]] domain '{domain}' is not a site of this scenario")
        if action in ("dns-redirect", "dns-inject"):
            if "answer" not in t:
                self.fail(line, f"action '{action}' in [[censor]] needs 'answer'")
            try:
                answer_ip = ipaddress.ip_address(t["answer"])
            except ValueError:
                self.fail(key("answer"), f"'answer' in [[censor]] must be an IPv4 or IPv6 address: {t['answer']!r}")
            if t.get("family") and t["family"] in FAMILIES and f"ipv{answer_ip.version}" != t["family"]:
                self.fail(key("answer"), f"'answer' in [[censor]] is an IPv{answer_ip.version} address but family = \"{t['family']}\"")
        elif "answer" in t:
            self.fail(key("answer"), f"'answer' in [[censor]] is only valid with dns-redirect or dns-inject, not '{action}'")
        if "page" in t and action != "http-blockpage":
            self.fail(key("page"), f"'page' in [[censor]] is only valid with http-blockpage, not '{action}'")
        if "status" in t:
            if action != "http-blockpage":
                self.fail(key("status"), f"'status' in [[censor]] is only valid with http-blockpage, not '{action}'")
            if not 100 <= t["status"] <= 599:
                self.fail(key("status"), "'status' in [[censor]] must be an HTTP status code (100-599)")
        if action == "throttle":
            if "rate_kbit" not in t:
                self.fail(line, "action 'throttle' in [[censor]] needs 'rate_kbit'")
            if t["rate_kbit"] <= 0:
                self.fail(key("rate_kbit"), "'rate_kbit' in [[censor]] must be positive")
        elif "rate_kbit" in t:
            self.fail(key("rate_kbit"), f"'rate_kbit' in [[censor]] is only valid with throttle, not '{action}'")
        family = t.get("family")
        if family is not None:
            if family not in FAMILIES:
                self.fail(key("family"), f"unknown family '{family}' in [[censor]] (expected one of: {', '.join(FAMILIES)})")
            if ip is not None and f"ipv{ipaddress.ip_network(ip, strict=False).version}" != family:
                self.fail(key("family"), f"family = \"{family}\" in [[censor]] does not match ip {ip!r}")
        page = t.get("page")
        if action == "http-blockpage" and page is None:
            page = "Access to this site is restricted."
        return CensorRule(action, domain, ip, t.get("answer"), page, t.get("status", 200), t.get("rate_kbit"), family, line)

    def expectation(self, table: dict, i: int, domains: dict) -> Expectation:
        spec = {"url": str, "status": str, "layer": str, "method": str}
        t = self.take(table, "expect", i, spec, ("url", "status"))
        line = self.where.table("expect", i)
        key = lambda k: self.where.key("expect", i, k)  # noqa: E731
        parts = urlsplit(t["url"])
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(key("url"), f"'url' in [[expect]] must be an http(s) URL: {t['url']!r}")
        if parts.hostname not in domains:
            self.fail(key("url"), f"[[expect]] url host '{parts.hostname}' is not a site of this scenario")
        if t["status"] not in STATUSES:
            self.fail(key("status"), f"unknown status '{t['status']}' in [[expect]] (expected one of: {', '.join(STATUSES)})")
        if "layer" in t and t["layer"] not in LAYERS:
            self.fail(key("layer"), f"unknown layer '{t['layer']}' in [[expect]] (expected one of: {', '.join(LAYERS)})")
        if t["status"] == "blocked" and "layer" not in t:
            self.fail(line, "status = \"blocked\" in [[expect]] needs 'layer'")
        if "method" in t and not re.fullmatch(r"[a-z]+\.[a-z_]+", t["method"]):
            self.fail(key("method"), f"'method' in [[expect]] must look like 'dns.nxdomain': {t['method']!r}")
        return Expectation(t["url"], t["status"], t.get("layer"), t.get("method"), line)


def parse_text(text: str, path: Path | str = "<scenario>") -> Scenario:
    return _Parser(Path(path), text).parse()


def load(path: Path | str) -> Scenario:
    """Parse a scenario file; ``ScenarioError`` (one line) on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read scenario: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path.name}:1: not UTF-8 text") from None
    return parse_text(text, path)
