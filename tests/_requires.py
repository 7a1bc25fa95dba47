"""Skip a test when a tool it needs is missing, except under CI, where it must be there."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_binary(name: str) -> str:
    """Return the path of *name*; skip locally, fail under CI, when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name!r} is not installed"
        if in_ci():
            pytest.fail(f"{message}; CI must provide it (see .ci/run)")
        pytest.skip(message)
    return path
