"""Fixtures for the throwaway-PostgreSQL tests: private runtime directories, helpers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.postgres import default_runtime_dir


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A private runtime directory beside the default one.

    Not ``tmp_path``: as root the server runs as another user, who cannot enter pytest's
    0700 ``/tmp/pytest-of-root``.
    """
    parent = default_runtime_dir().parent  # tmpfs when available, like the real thing
    path = Path(tempfile.mkdtemp(prefix="corral-test-pg-", dir=parent))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_dirs(runtime: Path) -> list[Path]:
    return sorted(p for p in runtime.iterdir() if p.name.startswith("run-"))
