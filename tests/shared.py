"""Where the read-only shared folder is: ``VANTAGE_SHARED``, else ``../shared``
beside the repository. Tests that need it skip when it is absent, except under
``CI=true``, where its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("VANTAGE_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


def shared_path(*parts: str) -> Path:
    """``SHARED/parts...``, or skip (fail under CI=true) when it does not exist."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: under CI=true the shared folder must be present")
        pytest.skip(f"{path} absent (set VANTAGE_SHARED)")
    return path
