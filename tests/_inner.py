"""A pytest run that a test starts: the variables it must not inherit from ours; starting it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Run-scoped variables of corral and xdist: an inner run inheriting them would join (or
# be mistaken for a worker of) the outer run instead of starting its own.
RUN_VARIABLES = (
    "EPHEMERAL_PIPE",
    "EPHEMERAL_SECRET",
    "CORRAL_PLUGIN_RUN",
    "CORRAL_DJANGO",
    "CORRAL_RUN_ID",
    "CORRAL_BROKER_URL",
    "CORRAL_MACHINES",
    "CORRAL_HOST",
    "CORRAL_DATABASE_URL",
    "CORRAL_SANDBOX_MODE",
    "CORRAL_DSN",
    "CORRAL_COLOCATE",
    "CORRAL_GC_FREEZE",
    "CORRAL_SHARD",
    "DATABASE_URL",
    # libpq's, which each test process of a run sets to its own database
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
    "PYTEST_ADDOPTS",
    "PYTEST_CURRENT_TEST",
)


def inner_env(**extra: str) -> dict[str, str]:
    """Our environment without the run's variables, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}
    env.update(extra)
    return env


def start_pytest(cwd: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``pytest *args`` in *cwd* (no cache), its output (stdout and stderr) piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
