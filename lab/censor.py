"""The on-path censor: iptables, tc and two helper processes in the censor
namespace, implementing every LAB.md censor action that happens on the path
(dns-nxdomain, dns-redirect and the resolver half of dns-drop belong to the ISP
resolver in lab/dnsservers.py).

Mechanics, per action:

* ip-blackhole / ip-reject — filter FORWARD: DROP everything to the site's
  addresses / REJECT TCP SYNs with a RST.
* dns-inject, dns-drop, http-*, tls-reset, tls-drop, throttle — packets that
  may need a look go to NFQUEUE (only port-53 traffic and the first few
  data-carrying packets of TCP 80/443 flows, via connbytes, so the worker is
  never in the bulk path). The worker (lab/dpi.py) forges what needs forging
  and answers with a verdict, possibly carrying a mark.
* Marks: the queue verdict ends the mangle FORWARD chain, so filter FORWARD,
  a later table at the same hook, saves the mark into the connection
  (CONNMARK) and DROPs flows with DROP_MARK; mangle PREROUTING restores the
  connection mark onto every later packet in both directions, so a decided
  flow is never queued again and stays dropped or shaped.
* throttle — each rule gets a mark and an htb class of ``rate_kbit`` on both
  censor interfaces (``probe_iface`` egress carries server→client,
  ``internet_iface`` egress client→server); mangle POSTROUTING CLASSIFYs
  marked packets into it; all else goes to a fast default class. (tc here has
  no fw classifier, hence CLASSIFY.)
* tls-mitm — nat PREROUTING REDIRECTs TCP 443 to the site's addresses to the
  local proxy (lab/mitm.py), which intercepts only the rule's SNI.

Forged packets leave through a raw socket with INJECT_MARK, which raw OUTPUT
exempts from conntrack: a forged DNS answer would otherwise create a reverse
entry that clashes with the still-queued genuine query and gets it dropped.

Both address families: with ``ipv6`` the same ruleset, for the IPv6
addresses, goes to ip6tables (the DPI worker parses and forges IPv6 packets
too; the proxy listens on both). A rule with ``family = "ipv4"`` or
``"ipv6"`` is installed, or matched by the worker, for that family only.

All rules live in chains of our own (VTG-*), so ``stop`` removes exactly what
``start`` added.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.pki import CA
    from lab.scenario import CensorRule

DROP_MARK = 0x7601
INJECT_MARK = 0x76FF
THROTTLE_MARK_BASE = 0x7610  # + rule index
THROTTLE_CLASS_BASE = 0x10   # htb minor id (hex in tc and CLASSIFY) + rule index
DEFAULT_CLASS = 0x1
QUEUE_NUM = 7
MITM_PORT = 8443
# Original-direction packets a flow may send before it is no longer queued:
# SYN, ACK, then the request/ClientHello, with room for a retransmission.
INSPECT_PACKETS = 8

DPI_ACTIONS = {"dns-inject", "dns-drop", "http-reset", "http-blockpage", "tls-reset", "tls-drop", "throttle"}
IP_ACTIONS = {"ip-blackhole", "ip-reject"}
# Implemented by the ISP resolver, not on the path.
RESOLVER_ACTIONS = {"dns-nxdomain", "dns-redirect"}
ON_PATH_ACTIONS = DPI_ACTIONS | IP_ACTIONS | {"tls-mitm"}

CHAINS = {  # table -> [(our chain, built-in chain it hangs off)]
    "raw": [("VTG-OUT", "OUTPUT")],
    "mangle": [("VTG-PRE", "PREROUTING"), ("VTG-FWD", "FORWARD"), ("VTG-POST", "POSTROUTING")],
    "nat": [("VTG-NAT", "PREROUTING")],
    "filter": [("VTG-FILTER", "FORWARD")],
}


class CensorError(RuntimeError):
    pass


def _addresses(rule, site_addresses: dict[str, list[str]]) -> list[str]:
    if getattr(rule, "ip", None):
        return [rule.ip]
    addrs = site_addresses.get(rule.domain or "", [])
    if not addrs:
        raise CensorError(f"{rule.action} rule (line {getattr(rule, 'line', 0)}): no addresses known for {rule.domain!r}")
    return addrs


def _cidr(address: str) -> str:
    return address if "/" in address else f"{address}/{128 if ':' in address else 32}"


def _version(address: str) -> int:
    return 6 if ":" in address else 4


def _applies(rule, version: int) -> bool:
    """Whether ``rule`` acts on IP version ``version`` (its ``family``, or both)."""
    family = getattr(rule, "family", None)
    return family is None or family == f"ipv{version}"


TOOLS = {4: ("iptables", "iptables-restore"), 6: ("ip6tables", "ip6tables-restore")}


def _hex(n: int) -> str:
    return format(n, "x")


@dataclass
class Censor:
    ns: str
    rules: list["CensorRule"]
    site_addresses: dict[str, list[str]]
    workdir: Path
    rogue_ca: "CA"
    probe_iface: str = "ce-is"
    internet_iface: str = "ce-in"
    ready_timeout: float = 20.0
    ipv6: bool = False  # also install the IPv6 ruleset (ip6tables)
    _children: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)
    _installed: bool = field(default=False, init=False, repr=False)
    _shaped: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        for rule in self.rules:
            if rule.action not in ON_PATH_ACTIONS | RESOLVER_ACTIONS:
                raise CensorError(f"unknown censor action {rule.action!r} (line {getattr(rule, 'line', 0)})")
            if rule.action in DPI_ACTIONS | {"tls-mitm"} and not rule.domain:
                raise CensorError(f"{rule.action} needs a domain (line {getattr(rule, 'line', 0)})")
            if rule.action == "dns-inject" and not rule.answer:
                raise CensorError(f"dns-inject needs an answer (line {getattr(rule, 'line', 0)})")
            if rule.action == "throttle" and not rule.rate_kbit:
                raise CensorError(f"throttle needs rate_kbit (line {getattr(rule, 'line', 0)})")

    # -- what to install ---------------------------------------------------

    @property
    def dpi_rules(self) -> list:
        return [r for r in self.rules if r.action in DPI_ACTIONS]

    @property
    def throttles(self) -> list:
        return [r for r in self.rules if r.action == "throttle"]

    @property
    def mitm_domains(self) -> list[str]:
        return [r.domain for r in self.rules if r.action == "tls-mitm"]

    def throttle_mark(self, index: int) -> int:
        return THROTTLE_MARK_BASE + index

    def dpi_config(self) -> dict:
        rules = []
        for r in self.dpi_rules:
            mark = None
            if r.action == "throttle":
                mark = self.throttle_mark(self.throttles.index(r))
            rules.append({"action": r.action, "domain": r.domain, "answer": r.answer, "page": r.page,
                          "status": getattr(r, "status", None) or 200, "mark": mark,
                          "family": getattr(r, "family", None)})
        return {"queue": QUEUE_NUM, "rules": rules, "drop_mark": DROP_MARK, "inject_mark": INJECT_MARK,
                "log": str(self.workdir / "dpi.log"), "ready": str(self.workdir / "dpi.ready")}

    def mitm_config(self) -> dict:
        return {"port": MITM_PORT, "domains": self.mitm_domains, "ca_name": self.rogue_ca.name,
                "ca_dir": str(self.rogue_ca.directory), "cert_dir": str(self.workdir / "mitm-certs"),
                "log": str(self.workdir / "mitm.log"), "ready": str(self.workdir / "mitm.ready")}

    @property
    def versions(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def iptables_rules(self, version: int = 4) -> str:
        """The whole ruleset for IP ``version`` as iptables-restore (or
        ip6tables-restore) input, applied with --noflush."""
        actions = {r.action for r in self.rules if _applies(r, version)}
        q = f"-j NFQUEUE --queue-num {QUEUE_NUM} --queue-bypass"
        # Data-carrying packets early in the flow only: not SYNs (nothing to
        # see), not tiny packets (pure ACKs without options), not the bulk.
        # (-m length counts the IP header: 20 bytes in IPv4, 40 in IPv6.)
        early = (f"! --syn -m connbytes --connbytes 0:{INSPECT_PACKETS} --connbytes-dir original "
                 f"--connbytes-mode packets -m length --length {41 if version == 4 else 61}:65535")
        out: dict[str, list[str]] = {t: [] for t in CHAINS}
        out["raw"].append(f"-A VTG-OUT -m mark --mark {INJECT_MARK:#x} -j CT --notrack")
        out["mangle"].append("-A VTG-PRE -j CONNMARK --restore-mark")
        # Already decided (marked) flows are never queued again.
        out["mangle"].append("-A VTG-FWD -m mark ! --mark 0 -j RETURN")
        if actions & {"dns-inject", "dns-drop"}:
            out["mangle"].append(f"-A VTG-FWD -p udp --dport 53 {q}")
        if "dns-drop" in actions:
            out["mangle"].append(f"-A VTG-FWD -p tcp --dport 53 {early} {q}")
        if actions & {"http-reset", "http-blockpage", "throttle"}:
            out["mangle"].append(f"-A VTG-FWD -p tcp --dport 80 {early} {q}")
        if actions & {"tls-reset", "tls-drop", "throttle"}:
            out["mangle"].append(f"-A VTG-FWD -p tcp --dport 443 {early} {q}")
        for i, _ in enumerate(self.throttles):
            mark, cls = self.throttle_mark(i), _hex(THROTTLE_CLASS_BASE + i)
            for iface in (self.probe_iface, self.internet_iface):
                out["mangle"].append(f"-A VTG-POST -o {iface} -m mark --mark {mark:#x} -j CLASSIFY --set-class 1:{cls}")
        out["filter"].append("-A VTG-FILTER -m mark ! --mark 0 -j CONNMARK --save-mark")
        out["filter"].append(f"-A VTG-FILTER -m mark --mark {DROP_MARK:#x} -j DROP")
        for r in self.rules:
            if not _applies(r, version):
                continue
            addresses = [a for a in _addresses(r, self.site_addresses) if _version(a) == version] if r.action in IP_ACTIONS | {"tls-mitm"} else []
            if r.action == "ip-blackhole":
                for a in addresses:
                    out["filter"].append(f"-A VTG-FILTER -d {_cidr(a)} -j DROP")
            elif r.action == "ip-reject":
                for a in addresses:
                    out["filter"].append(f"-A VTG-FILTER -d {_cidr(a)} -p tcp --syn -j REJECT --reject-with tcp-reset")
            elif r.action == "tls-mitm":
                for a in addresses:
                    out["nat"].append(f"-A VTG-NAT -i {self.probe_iface} -d {_cidr(a)} -p tcp --dport 443 "
                                      f"-j REDIRECT --to-ports {MITM_PORT}")
        lines = []
        for table, chains in CHAINS.items():
            lines.append(f"*{table}")
            lines += [f":{chain} - [0:0]" for chain, _ in chains]
            lines += [f"-I {builtin} 1 -j {chain}" for chain, builtin in chains]
            lines += out[table]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def tc_commands(self) -> list[list[str]]:
        cmds = []
        for iface in (self.probe_iface, self.internet_iface):
            cmds.append(["tc", "qdisc", "replace", "dev", iface, "root", "handle", "1:", "htb", "default", _hex(DEFAULT_CLASS)])
            cmds.append(["tc", "class", "add", "dev", iface, "parent", "1:", "classid", f"1:{_hex(DEFAULT_CLASS)}",
                         "htb", "rate", "10gbit", "quantum", "60000"])
            for i, r in enumerate(self.throttles):
                cls = f"1:{_hex(THROTTLE_CLASS_BASE + i)}"
                cmds.append(["tc", "class", "add", "dev", iface, "parent", "1:", "classid", cls, "htb",
                             "rate", f"{r.rate_kbit}kbit", "ceil", f"{r.rate_kbit}kbit", "quantum", "1514"])
                # A tbf leaf at the same rate splits GSO super-packets (veth
                # forwards 64 KB ones) into MTU-sized segments before htb
                # accounts them, so the rate holds at a fine grain instead of
                # in 64 KB lumps. Its queue holds ~0.4 s: a deeper one would
                # make a new throttled flow wait behind an old one's backlog.
                limit = max(6000, r.rate_kbit * 1000 // 8 * 4 // 10)
                cmds.append(["tc", "qdisc", "add", "dev", iface, "parent", cls, "tbf", "rate", f"{r.rate_kbit}kbit",
                             "burst", "3000", "limit", str(limit)])
        return cmds

    # -- lifecycle ---------------------------------------------------------

    def _exec(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", "netns", "exec", self.ns, *args], input=input, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise CensorError(f"{' '.join(args[:4])}... failed in {self.ns}: {proc.stderr.strip()}")
        return proc

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._installed = True
        for version in self.versions:
            self._exec(TOOLS[version][1], "-w", "--noflush", input=self.iptables_rules(version))
        if self.throttles:
            self._shaped = True
            for cmd in self.tc_commands():
                self._exec(*cmd)
        if self.dpi_rules:
            self._launch("dpi", "lab.dpi", self.dpi_config())
        if self.mitm_domains:
            self._launch("mitm", "lab.mitm", self.mitm_config())
        deadline = time.monotonic() + self.ready_timeout
        for name in self._children:
            self._wait_ready(name, deadline)

    def _launch(self, name: str, module: str, config: dict) -> None:
        ready = Path(config["ready"])
        ready.unlink(missing_ok=True)
        cfg = self.workdir / f"{name}.json"
        cfg.write_text(json.dumps(config, indent=1))
        stderr = open(self.workdir / f"{name}.stderr", "wb")
        # The children import lab.* from the same tree as we do.
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self._children[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", module, "--config", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env, start_new_session=True)
        finally:
            stderr.close()

    def _wait_ready(self, name: str, deadline: float) -> None:
        proc = self._children[name]
        ready = self.workdir / f"{name}.ready"
        while not ready.exists():
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.stderr").read_text(errors="replace")[-2000:]
                raise CensorError(f"censor {name} exited with {proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise CensorError(f"censor {name} not ready after {self.ready_timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the children and remove our rules and qdiscs. Idempotent."""
        for name, proc in list(self._children.items()):
            # `ip netns exec` execs the command, so this pid is the worker itself.
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=3)
            del self._children[name]
        if self._installed:
            for version in self.versions:
                tool = TOOLS[version][0]
                for table, chains in CHAINS.items():
                    for chain, builtin in chains:
                        # Repeat in case a failed start left the jump twice.
                        while self._exec(tool, "-w", "-t", table, "-D", builtin, "-j", chain, check=False).returncode == 0:
                            pass
                        self._exec(tool, "-w", "-t", table, "-F", chain, check=False)
                        self._exec(tool, "-w", "-t", table, "-X", chain, check=False)
            self._installed = False
        if self._shaped:
            for iface in (self.probe_iface, self.internet_iface):
                self._exec("tc", "qdisc", "del", "dev", iface, "root", check=False)
            self._shaped = False

    def __enter__(self) -> "Censor":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
