"""Lab topology: namespaces come up with the plan's addresses and routes, and
go away completely (also when a run crashed and left them behind)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from lab import plan
from lab.topology import NETNS_ETC, RUN_DIR, Lab, in_netns, live_prefixes, teardown_prefix

from rootonly import require_root

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def need_root():
    require_root("ip")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def gone(lab: Lab) -> None:
    assert not (set(lab.namespaces) & netns_names())
    assert not any((NETNS_ETC / ns).exists() for ns in lab.namespaces)
    assert not lab.state_file.exists()
    assert lab.prefix not in live_prefixes()


def test_up_and_down_leave_nothing_behind():
    with Lab() as lab:
        assert set(lab.namespaces) <= netns_names()
        assert lab.state_file.exists()
        assert (NETNS_ETC / lab.ns("probe") / "resolv.conf").read_text().count(plan.ISP_RESOLVER) == 1
        assert plan.CONTROL_RESOLVER in (NETNS_ETC / lab.ns("control") / "resolv.conf").read_text()
        route = lab.run("probe", ["ip", "route", "get", "198.18.53.1"]).stdout
        assert "via 198.18.1.1" in route
        route = lab.run("control", ["ip", "route", "get", "198.18.53.1"]).stdout
        assert "via 198.18.4.1" in route
        assert lab.run("censor", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
        assert lab.run("probe", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "0"
        proc = lab.spawn("probe", ["sleep", "60"], "sleeper", ready=False)
    gone(lab)
    assert proc.popen.poll() is not None


def test_probe_reaches_internet_through_isp_and_censor():
    with Lab() as lab:
        lab.add_internet_addresses(["198.18.100.7"])
        server = lab.spawn("internet", ["python3", "-c",
            "import socket;s=socket.create_server(('198.18.100.7',80));print('READY',flush=True);c,a=s.accept();c.sendall(a[0].encode())"], "echo")
        def peer():
            with socket.create_connection(("198.18.100.7", 80), timeout=3) as s:
                return s.recv(100).decode()
        # The site sees the probe's own address: routed, no NAT anywhere.
        assert in_netns(lab.ns("probe"), peer) == plan.PROBE_ADDRESS
        assert server.popen.wait(timeout=5) == 0


def test_teardown_on_exception():
    with pytest.raises(RuntimeError):
        with Lab() as lab:
            raise RuntimeError("boom")
    gone(lab)


def test_stale_lab_is_cleaned():
    # A crashed run: the namespaces and the state file stay, nobody tears down.
    lab = Lab()
    lab.up()
    lab._up = False  # simulate the owner dying without teardown
    lab.spawn("isp", ["sleep", "60"], "orphan", ready=False)
    assert lab.prefix in live_prefixes()
    teardown_prefix(lab.prefix)
    gone(lab)


def test_sigterm_tears_down(tmp_path):
    code = (
        "import time, sys\n"
        "from lab.topology import Lab\n"
        "with Lab() as lab:\n"
        "    print(lab.prefix, flush=True)\n"
        "    time.sleep(30)\n"
    )
    proc = subprocess.Popen(["python3", "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith("vl") and (RUN_DIR / f"{prefix}.json").exists()
    proc.terminate()
    proc.wait(timeout=10)
    assert not {f"{prefix}-{r}" for r in plan.ROLES} & netns_names()
    assert not (RUN_DIR / f"{prefix}.json").exists()
