"""Per-phase time limits of one measurement, in seconds.

Each primitive gets the limit of its own phase as a *total* deadline for that
operation (a server that trickles bytes never resets it); ``measurement`` bounds
the whole chain of steps for one input and is enforced by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    dns: float = 5.0  # one lookup (system, UDP incl. nothing received, DoH)
    connect: float = 8.0  # TCP three-way handshake
    tls: float = 8.0  # TLS handshake, after the TCP connection is up
    http: float = 15.0  # one HTTP hop: connect + TLS + request + body
    measurement: float = 60.0  # everything done for one input
