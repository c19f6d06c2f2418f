"""A minimal three-namespace network for testing the censor on its own:

    client ns ── censor ns ── server ns

It mirrors the lab's addressing (lab/plan.py) closely enough that the censor
sees the same interface names (``ce-is`` towards the client, ``ce-in`` towards
the servers) and the same 198.18.0.0/15 addresses, without needing the rest of
the lab (ISP resolver, authoritative DNS, sites). Namespace names carry a
random prefix so that concurrent runs, and the full lab, never collide.

Test code talks from a namespace without spawning processes: a socket belongs
to the network namespace its creating thread was in, so ``socket_in`` makes it
in a thread that joined the namespace (``lab.topology.in_netns``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
from dataclasses import dataclass, field

from lab import plan
from lab.topology import in_netns

CLIENT_ADDRESS = "198.18.2.1"        # where the ISP resolver's queries would come from
CENSOR_CLIENT_SIDE = plan.CENSOR_PROBE_SIDE
CENSOR_SERVER_SIDE = plan.CENSOR_INTERNET_SIDE
SERVER_LINK_ADDRESS = "198.18.3.2"
DNS_ADDRESS = plan.AUTHORITATIVE_DNS
# Site addresses; a test picks one per behaviour so IP-level rules can be told apart.
SITE_ADDRESSES = [f"198.18.100.{i}" for i in range(1, 7)]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def socket_in(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of namespace ``ns`` (made by a thread that joined it)."""
    return in_netns(ns, socket.socket, family, kind)


@dataclass
class LabNet:
    prefix: str = field(default_factory=lambda: "vt" + secrets.token_hex(3))
    created: list[str] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def censor(self) -> str:
        return f"{self.prefix}-ce"

    @property
    def server(self) -> str:
        return f"{self.prefix}-sv"

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", ns, *args, check=check)

    def up(self) -> "LabNet":
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        for ns in (self.client, self.censor, self.server):
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # Create each veth pair directly inside its namespaces so the fixed
        # names (ce-is, ce-in) never exist in the root namespace, where a
        # concurrent lab could hold the same names.
        cl_if, ce_cl = plan.iface("isp", "censor"), plan.iface("censor", "isp")
        ce_sv, sv_if = plan.iface("censor", "internet"), plan.iface("internet", "censor")
        _run("ip", "link", "add", ce_cl, "netns", self.censor, "type", "veth", "peer", "name", cl_if, "netns", self.client)
        _run("ip", "link", "add", ce_sv, "netns", self.censor, "type", "veth", "peer", "name", sv_if, "netns", self.server)
        for ns, dev, addr in (
            (self.client, cl_if, CLIENT_ADDRESS),
            (self.censor, ce_cl, CENSOR_CLIENT_SIDE),
            (self.censor, ce_sv, CENSOR_SERVER_SIDE),
            (self.server, sv_if, SERVER_LINK_ADDRESS),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        for addr in [DNS_ADDRESS, *SITE_ADDRESSES]:
            _run("ip", "-n", self.server, "addr", "add", f"{addr}/32", "dev", "lo")
        _run("ip", "-n", self.client, "route", "add", "default", "via", CENSOR_CLIENT_SIDE)
        _run("ip", "-n", self.server, "route", "add", "default", "via", CENSOR_SERVER_SIDE)
        for net in ("198.18.53.0/24", plan.SITE_NETWORK):
            _run("ip", "-n", self.censor, "route", "add", net, "via", SERVER_LINK_ADDRESS)
        self.exec(self.censor, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def down(self) -> None:
        """Kill anything still running in our namespaces, then delete them.
        Safe to call twice and after a partial build."""
        for ns in self.created:
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.created):
            _run("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def __enter__(self) -> "LabNet":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
