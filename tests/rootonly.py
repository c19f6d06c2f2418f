"""Tests that need root (network namespaces) skip on a developer laptop, but
under CI=true a skip would hide a missing feature, so they fail instead."""

from __future__ import annotations

import os
import shutil

import pytest


def require_root(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces)"
    elif missing:
        reason = f"needs {', '.join(missing)}"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: under CI=true this test may not skip")
        pytest.skip(reason)
