"""Network namespaces and links of one lab (the LAB.md topology, lab/plan.py addresses).

    probe ── isp ── censor ── internet ── control

A lab is named by a unique prefix ``vl<6 hex>``; its namespaces are
``<prefix>-<role>``. While it lives, /run/vantage-lab/<prefix>.json records its
namespaces, owner and processes, so ``vantage lab down`` can remove what a
crashed run left behind. Teardown runs on normal exit, on exceptions, on
SIGINT/SIGTERM (handlers turn them into exceptions so ``with`` blocks unwind)
and at interpreter exit (atexit, as a last resort).

Everything happens inside the namespaces: veth pairs are created directly in
their namespaces (``ip -n``), so no interface ever appears in the host's
namespace and no route points at the host's network.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import VantageError

from . import plan

RUN_DIR = Path("/run/vantage-lab")
NETNS_ETC = Path("/etc/netns")
NS_PATTERN = re.compile(r"^(vl[0-9a-f]{6})-(" + "|".join(plan.ROLES + plan.ROUTER_ROLES) + r")$")
REQUIRED_TOOLS = ("ip", "iptables", "tc")
# The internet's own addresses (sites, DNS servers) live on its loopback: the
# `dummy` link type needs a kernel module that containers often lack, and /32
# addresses on lo are delivered locally just the same.
DUMMY = "lo"

# Each namespace's /etc/resolv.conf (bind-mounted by `ip netns exec`): the
# probe uses its ISP's resolver, the control its own, the rest the public one.
RESOLV = {
    "probe": plan.ISP_RESOLVER,
    "isp": plan.ISP_RESOLVER,
    "censor": plan.PUBLIC_RESOLVER,
    "internet": plan.PUBLIC_RESOLVER,
    "control": plan.CONTROL_RESOLVER,
}


class LabError(VantageError):
    """The lab cannot be built or run; the message is one line for the user."""


def check_prerequisites(tools: tuple[str, ...] = REQUIRED_TOOLS) -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces): run it with sudo")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hint = " (apt-get install iproute2 iptables)" if missing else ""
        raise LabError(f"missing tool(s) needed by the lab: {', '.join(missing)}{hint}")


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"`{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}` failed: {detail[-1] if detail else proc.returncode}")
    return proc


@dataclass
class Process:
    role: str
    name: str
    popen: subprocess.Popen
    log: Path | None = None


@dataclass
class Lab:
    """One lab's namespaces. Use as a context manager: ``with Lab() as lab: ...``."""

    prefix: str = field(default_factory=lambda: "vl" + secrets.token_hex(3))
    workdir: Path | None = None
    processes: list[Process] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # saved in the state file (scenario, shell env)
    # IPv6 (lab/plan.py LINKS6): off everywhere unless ``ipv6``; then on in every
    # namespace but the probe's, which follows ``probe_ipv6`` (LAB.md): "none"
    # (no IPv6 at all), "broken" (an address and a default route, but the isp
    # has no IPv6 route beyond itself: connects fail with network unreachable)
    # or "working".
    ipv6: bool = False
    probe_ipv6: str = "none"
    hops: int = 0  # routers between the isp and the censor (lab/plan.py router_chain)
    _up: bool = False
    _old_handlers: dict = field(default_factory=dict)

    # --- names ---------------------------------------------------------------------

    def ns(self, role: str) -> str:
        if role not in plan.ROLES and role not in plan.ROUTER_ROLES[:self.hops]:
            raise ValueError(f"unknown lab role {role!r}")
        return f"{self.prefix}-{role}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in plan.ROLES + plan.ROUTER_ROLES[:self.hops]]

    @property
    def state_file(self) -> Path:
        return RUN_DIR / f"{self.prefix}.json"

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    # --- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> "Lab":
        self._install_handlers()
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _shield_teardown(self) -> None:
        """A second Ctrl-C during teardown must not leave namespaces behind."""
        import threading

        if threading.current_thread() is not threading.main_thread() or not self._old_handlers:
            return  # handlers we did not install are not ours to change
        for sig in self._old_handlers:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):
                pass

    def _install_handlers(self) -> None:
        atexit.register(self.down)
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            # Unwind through the `with` block (which tears down) instead of dying
            # with namespaces left behind.
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, on_signal)
            except (ValueError, OSError):
                pass

    def _restore_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._old_handlers.clear()

    def up(self) -> None:
        check_prerequisites()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        if self.workdir is None:
            self.workdir = RUN_DIR / self.prefix
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._up = True
        self.save_state()  # before creating anything, so a crash mid-way is still cleanable
        for role in plan.ROLES:
            _run(["ip", "netns", "add", self.ns(role)])
            self._sysctl(role, "net.ipv4.ip_forward", "1" if role in ("isp", "censor", "internet") else "0")
            if self.has_ipv6(role):
                # No router advertisements, no DAD (addresses usable at once),
                # and no ICMPv6 rate limit: every failed connect gets its error.
                for key, value in (("conf.all.accept_ra", "0"), ("conf.default.accept_ra", "0"),
                                   ("conf.all.accept_dad", "0"), ("conf.default.accept_dad", "0"),
                                   ("conf.all.forwarding", "1" if role in ("isp", "censor", "internet") else "0"),
                                   ("icmp.ratelimit", "0"),
                                   ("conf.all.disable_ipv6", "0"), ("conf.default.disable_ipv6", "0")):
                    self._sysctl(role, f"net.ipv6.{key}", value)
            else:
                # IPv6 off where the scenario has none: DAD/router solicitations would add noise.
                self._sysctl(role, "net.ipv6.conf.all.disable_ipv6", "1")
                self._sysctl(role, "net.ipv6.conf.default.disable_ipv6", "1")
            # Loose-mode-free forwarding: asymmetric paths do not exist here, but
            # rp_filter's defaults differ between kernels; make them explicit.
            self._sysctl(role, "net.ipv4.conf.all.rp_filter", "0")
            self._sysctl(role, "net.ipv4.conf.default.rp_filter", "0")
            _run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
            etc = NETNS_ETC / self.ns(role)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"# vantage lab {self.prefix}\nnameserver {RESOLV[role]}\noptions timeout:3 attempts:1\n")
            # Name lookups go to that resolver only: on a host where nsswitch
            # sends them to systemd-resolved or nscd over a Unix socket, they
            # would otherwise reach the host's resolver and the real network.
            (etc / "nsswitch.conf").write_text("hosts: files dns\n")
        for left, right, left_ip, right_ip in plan.LINKS:
            a, b = plan.iface(left, right), plan.iface(right, left)
            _run(["ip", "-n", self.ns(left), "link", "add", a, "type", "veth", "peer", "name", b, "netns", self.ns(right)])
            for role, name, ip in ((left, a, left_ip), (right, b, right_ip)):
                _run(["ip", "-n", self.ns(role), "addr", "add", f"{ip}/24", "dev", name])
                _run(["ip", "-n", self.ns(role), "link", "set", name, "up"])
        for left, right, left_ip, right_ip in plan.LINKS6:
            if not self._link6(left, right):
                continue
            a, b = plan.iface(left, right), plan.iface(right, left)
            for role, name, ip in ((left, a, left_ip), (right, b, right_ip)):
                _run(["ip", "-n", self.ns(role), "addr", "add", f"{ip}/64", "dev", name, "nodad"])
        # The internet's own addresses (DNS servers; sites are added by add_internet_addresses).
        self.add_internet_addresses([plan.AUTHORITATIVE_DNS, plan.PUBLIC_RESOLVER])
        self._routes()
        self._add_routers()
        self.save_state()

    def _sysctl(self, role: str, key: str, value: str) -> None:
        path = Path("/proc/sys") / key.replace(".", "/")
        _run(self.exec_argv(role, ["sh", "-c", f"echo {value} > {path}"]), check=False)

    def _routes(self) -> None:
        ip = lambda role, *args: _run(["ip", "-n", self.ns(role), "route", *args])  # noqa: E731
        probe_isp, isp_censor, censor_internet, internet_control = plan.LINKS
        ip("probe", "add", "default", "via", probe_isp[3])
        ip("isp", "add", "default", "via", isp_censor[3])
        # The censor reaches the probe side through the isp and everything else
        # (sites, DNS, control network) through the internet.
        ip("censor", "add", "198.18.1.0/24", "via", isp_censor[2])
        ip("censor", "add", "default", "via", censor_internet[3])
        # The internet routes the probe side back through the censor; the control
        # network is directly attached, so the control's path never meets the censor.
        ip("internet", "add", "198.18.1.0/24", "via", censor_internet[2])
        ip("internet", "add", "198.18.2.0/24", "via", censor_internet[2])
        ip("control", "add", "default", "via", internet_control[2])
        if not self.ipv6:
            return
        ip6 = lambda role, *args: _run(["ip", "-6", "-n", self.ns(role), "route", *args])  # noqa: E731
        probe_isp, isp_censor, censor_internet, internet_control = plan.LINKS6
        if self.probe_ipv6 != "none":
            ip6("probe", "add", "default", "via", probe_isp[3])
        reaches = self.probe_ipv6 == "working"  # "broken": nothing routes beyond the isp
        if reaches:
            ip6("isp", "add", "default", "via", isp_censor[3])
            ip6("censor", "add", "2001:2:0:1::/64", "via", isp_censor[2])
            ip6("internet", "add", "2001:2:0:1::/64", "via", censor_internet[2])
            ip6("internet", "add", "2001:2:0:2::/64", "via", censor_internet[2])
        ip6("censor", "add", "default", "via", censor_internet[3])
        ip6("control", "add", "default", "via", internet_control[2])

    # --- hops = N: routers between the isp and the censor -----------------------------

    def _add_routers(self) -> None:
        """Replace the isp ── censor link by isp ── r1 ── ... ── rN ── censor
        (lab/plan.py router_chain), each router forwarding and answering ICMP
        time-exceeded. ICMP errors are not rate-limited anywhere on the path,
        so a traceroute gets an answer from every hop. IPv4 only."""
        for role in ("isp", "censor", "internet", *plan.ROUTER_ROLES[:self.hops]):
            if role in plan.ROUTER_ROLES:
                _run(["ip", "netns", "add", self.ns(role)])
                self.save_state()
                for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.disable_ipv6", "1"),
                                   ("net.ipv6.conf.default.disable_ipv6", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                                   ("net.ipv4.conf.default.rp_filter", "0")):
                    self._sysctl(role, key, value)
                _run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
            self._sysctl(role, "net.ipv4.icmp_ratelimit", "0")
        if not self.hops:
            return
        _run(["ip", "-n", self.ns("isp"), "link", "del", "is-ce"])  # its peer ce-is goes with it
        chain = plan.router_chain(self.hops)
        for left, right, left_ip, right_ip, a, b in chain:
            _run(["ip", "-n", self.ns(left), "link", "add", a, "type", "veth", "peer", "name", b, "netns", self.ns(right)])
            for role, name, address in ((left, a, left_ip), (right, b, right_ip)):
                _run(["ip", "-n", self.ns(role), "addr", "add", f"{address}/24", "dev", name])
                _run(["ip", "-n", self.ns(role), "link", "set", name, "up"])
        ip = lambda role, *args: _run(["ip", "-n", self.ns(role), "route", *args])  # noqa: E731
        ip("isp", "replace", "default", "via", chain[0][3])
        for k, (left, right, left_ip, right_ip, _, _) in enumerate(chain):
            if right == "censor":
                ip("censor", "replace", "198.18.1.0/24", "via", left_ip)
                ip("censor", "replace", "198.18.2.0/24", "via", left_ip)
            else:  # a router: the probe side back down the chain, everything else up
                ip(right, "add", "default", "via", chain[k + 1][3])
                ip(right, "replace", "198.18.1.0/24", "via", left_ip)
                if k:
                    ip(right, "replace", "198.18.2.0/24", "via", left_ip)

    # --- end of hops ---------------------------------------------------------------

    def has_ipv6(self, role: str) -> bool:
        if not self.ipv6:
            return False
        return role != "probe" or self.probe_ipv6 != "none"

    def _link6(self, left: str, right: str) -> bool:
        """Whether the link gets IPv6 addresses: both ends have IPv6, and a broken
        probe IPv6 stops at the isp (its link to the censor stays IPv4-only)."""
        if not (self.has_ipv6(left) and self.has_ipv6(right)):
            return False
        return not ((left, right) == ("isp", "censor") and self.probe_ipv6 != "working")

    def add_internet_addresses(self, addresses: list[str]) -> None:
        """Put addresses (sites, resolvers) on the internet namespace's loopback."""
        if not addresses:
            return
        batch = "".join(f"addr add {a}/{128 if ':' in a else 32} dev {DUMMY}\n" for a in addresses)
        _run(["ip", "-n", self.ns("internet"), "-batch", "-"], input=batch)

    # --- processes -----------------------------------------------------------------

    def spawn(self, role: str, argv: list[str], name: str, *, ready: bool = True, timeout: float = 15.0, env: dict | None = None) -> Process:
        """Start ``argv`` in ``role``'s namespace in its own process group.

        With ``ready``, wait until the process prints a line ``READY`` on stdout
        (our servers do once every socket is bound), so callers never race a
        server that is still starting."""
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        popen = subprocess.Popen(
            self.exec_argv(role, argv),
            stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
            stderr=open(log, "ab"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        proc = Process(role, name, popen, log)
        self.processes.append(proc)
        self.save_state()
        if ready:
            self._wait_ready(proc, timeout)
        return proc

    def _wait_ready(self, proc: Process, timeout: float) -> None:
        sel = selectors.DefaultSelector()
        sel.register(proc.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                chunk = os.read(proc.popen.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"READY" in buf:
                    return
        finally:
            sel.close()
        tail = proc.log.read_text(errors="replace").strip().splitlines()[-1:] if proc.log and proc.log.exists() else []
        raise LabError(f"{proc.name} did not start in the {proc.role} namespace" + (f": {tail[0]}" if tail else f" (see {proc.log})"))

    def run(self, role: str, argv: list[str], *, timeout: float = 60.0, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command to completion in ``role``'s namespace."""
        return subprocess.run(self.exec_argv(role, argv), capture_output=True, text=True, timeout=timeout, input=input, env=env)

    def stop_process(self, proc: Process, grace: float = 2.0) -> None:
        _kill_group(proc.popen.pid, grace, proc.popen)
        try:
            proc.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        if proc.popen.stdout:
            proc.popen.stdout.close()

    # --- state ---------------------------------------------------------------------

    def save_state(self) -> None:
        if not self._up:
            return
        state = {
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "owner_pid": os.getpid(),
            "pids": [p.popen.pid for p in self.processes],
            "workdir": str(self.workdir) if self.workdir else None,
            "created": time.time(),
            **self.extra,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def down(self) -> None:
        """Remove everything this lab created. Idempotent, never raises."""
        if not self._up:
            self._restore_handlers()
            return
        self._shield_teardown()
        for proc in reversed(self.processes):
            try:
                self.stop_process(proc)
            except Exception:
                pass
        self.processes.clear()
        teardown_prefix(self.prefix, keep_workdir=bool(os.environ.get("VANTAGE_LAB_KEEP")))
        # Only now: a teardown cut short stays due (atexit runs it again).
        self._up = False
        self._restore_handlers()
        try:
            atexit.unregister(self.down)
        except Exception:
            pass


_CLONE_NEWNET = 0x40000000


def in_netns(ns: str, fn, *args, timeout: float = 30.0):
    """Call ``fn(*args)`` in a fresh thread that has joined network namespace
    ``ns``; return its result (or raise its exception).

    setns(CLONE_NEWNET) changes only the calling thread, and sockets keep the
    namespace they were created in, so this lets tests and the runner talk from
    inside a namespace without starting a Python interpreter there."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    result: dict = {}

    def target():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"call in {ns} did not finish within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _kill_group(pid: int, grace: float = 2.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left.

    With ``popen`` (our own child) we reap it while waiting: an unreaped
    zombie would keep the group "alive" for killpg(0) and cost the full grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if popen is not None:
                popen.poll()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def _in_lab(pid: int, prefix: str) -> bool:
    try:
        ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return False
    for role in plan.ROLES + plan.ROUTER_ROLES:
        try:
            if os.stat(f"/run/netns/{prefix}-{role}").st_ino == ino:
                return True
        except OSError:
            pass
    return False


def _is_vantage(pid: int) -> bool:
    try:
        return b"vantage" in Path(f"/proc/{pid}/cmdline").read_bytes() or b"lab" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _netns_pids(ns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def teardown_prefix(prefix: str, keep_workdir: bool = False) -> None:
    """Delete a lab's namespaces (killing whatever still runs in them), its
    /etc/netns directories, its state file and its work directory."""
    state_file = RUN_DIR / f"{prefix}.json"
    pids: list[int] = []
    workdir = RUN_DIR / prefix
    try:
        state = json.loads(state_file.read_text())
        pids = state.get("pids", [])
        if state.get("workdir"):
            workdir = Path(state["workdir"])
    except (OSError, ValueError):
        pass
    for pid in pids:
        # A stale state file's pids may have been reused by unrelated processes:
        # only kill those that still live in one of this lab's namespaces.
        if pid != os.getpid() and _in_lab(pid, prefix):
            _kill_group(pid, grace=1.0)
    for role in plan.ROLES + plan.ROUTER_ROLES:
        ns = f"{prefix}-{role}"
        if Path("/run/netns", ns).exists():
            # Anything started in the namespace by other means (a shell, the censor's workers).
            for pid in _netns_pids(ns):
                if pid != os.getpid():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    state_file.unlink(missing_ok=True)
    if not keep_workdir and workdir.is_relative_to(RUN_DIR):
        shutil.rmtree(workdir, ignore_errors=True)


def live_prefixes() -> list[str]:
    """Prefixes of every lab known from state files or existing namespaces."""
    found: set[str] = set()
    if RUN_DIR.is_dir():
        for f in RUN_DIR.glob("vl*.json"):
            found.add(f.stem)
    proc = _run(["ip", "netns", "list"], check=False) if shutil.which("ip") else None
    for line in (proc.stdout.splitlines() if proc else []):
        m = NS_PATTERN.match(line.split()[0]) if line.strip() else None
        if m:
            found.add(m.group(1))
    return sorted(found)


def read_state(prefix: str) -> dict | None:
    try:
        return json.loads((RUN_DIR / f"{prefix}.json").read_text())
    except (OSError, ValueError):
        return None


def down_all() -> list[str]:
    """Tear down every live or stale lab; returns the prefixes removed.

    A lab's owner (`vantage lab up` in another terminal) is asked to stop first
    so it can tear down cleanly; whatever remains is removed here."""
    check_prerequisites(("ip",))
    removed = []
    for prefix in live_prefixes():
        state = read_state(prefix)
        owner = state.get("owner_pid") if state else None
        if owner and owner != os.getpid() and _is_vantage(owner):
            try:
                os.kill(owner, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and (RUN_DIR / f"{prefix}.json").exists():
                    time.sleep(0.1)
            except ProcessLookupError:
                pass
        teardown_prefix(prefix)
        removed.append(prefix)
    return removed
