"""Every example suite in ``examples/`` passes as its README runs it (with ``-n 2`` here).

Each runs in a subprocess from its own directory, so its own pytest configuration
applies, against this session's PostgreSQL (``CORRAL_DSN``); afterwards no clone
database of the run is left on that server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests._inner import RUN_VARIABLES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _clones(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database"
            " WHERE datname LIKE 'corral%' AND NOT datistemplate AND datname NOT LIKE 'corral_tpl%'"
        ).fetchall()
    return {name for (name,) in rows}


def run_example(name: str, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}
    env["CORRAL_DSN"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", *args],
        cwd=EXAMPLES / name,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tests"),
    [("psycopg_pool", 34), ("fastapi_sqlalchemy", 100), ("jest_style", 41)],
)
def test_example_suite_passes_in_parallel(name: str, tests: int, postgres_dsn: str) -> None:
    before = _clones(postgres_dsn)
    result = run_example(name, postgres_dsn)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    summary = re.search(r"=+ (.*) in [\d.]+s", result.stdout)
    assert summary is not None, output[-4000:]
    assert summary.group(1) == f"{tests} passed", output[-4000:]
    assert _clones(postgres_dsn) == before, "the example's run left clone databases behind"
