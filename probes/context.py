"""What every test needs to run: timeouts, trust, resolvers, helpers, sessions.

Built once per run by the runner and shared by all measurements of the run.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from core.net import Policy

from .timeouts import Timeouts


@dataclass
class ProbeContext:
    timeouts: Timeouts = field(default_factory=Timeouts)
    ssl_context: ssl.SSLContext | None = None
    resolver: str | None = None           # UDP resolver "ip[:port]" queried with dnspython
    doh_url: str | None = None            # DNS over HTTPS resolver (None: skipped)
    helpers: list[str] = field(default_factory=list)
    session: Any = None                   # aiohttp.ClientSession for control and DoH
    extra_ca_file: str | None = None
    dns_linger: float = 1.0               # how long to keep listening for late DNS answers
    # Non-public networks a redirect may lead into (``--public-network``, the
    # lab's ranges); every other loopback/private/link-local target is refused.
    allow: Policy = field(default_factory=Policy)
    # The packet probes' settings (probes/dns_injection.py, traceroute.py):
    # target, control_domain, runs, pause, window.
    packet: dict = field(default_factory=dict)

    def tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            from .tls import make_context

            self.ssl_context = make_context(self.extra_ca_file)
        return self.ssl_context
