"""Test-suite wide fixtures: plugin modules named ``tests/fix_*.py``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from corral._versions import installed, release

# Co-location's machine-wide CPU claims (corral._plugin._cpuclaim): the inner runs of this
# suite claim in a directory of their own, so they neither take CPUs from corral runs
# elsewhere on the machine nor lose co-location to them (which would fail their checks).
os.environ["CORRAL_CPU_CLAIMS"] = _CLAIMS = tempfile.mkdtemp(prefix="corral-test-cpu-claims-")
atexit.register(shutil.rmtree, _CLAIMS, ignore_errors=True)

pytest_plugins = ["tests.fix_broker", "tests.fix_postgres", "tests.fix_redis", "tests.fix_sandbox"]

# The apps of tests/plugin/test_real_apps.py are projects with suites of their own, run
# in subprocesses from a copy; this run does not collect them.
collect_ignore = ["real_apps"]


def pytest_configure(config: pytest.Config) -> None:
    if release(installed("pytest-asyncio") or "0") < (1,):
        # pytest-asyncio < 1.0 leaves event loops unclosed (reproduced without corral: 0.26
        # with anyio 4.0); their self-pipe sockets are collected during some later test,
        # which filterwarnings=error fails depending on garbage collection. Ignored at those
        # versions only (the sample suite does the same, tests/plugin/sample/conftest.py).
        config.addinivalue_line("filterwarnings", "ignore:unclosed event loop:ResourceWarning")
        config.addinivalue_line(
            "filterwarnings", r"ignore:unclosed <socket.socket fd=\d+, family=1:ResourceWarning"
        )
