"""Apps laid out as real projects are, each adopting corral with ini lines and one
``sandbox(...)`` line: their suites pass serially and under ``-n 2``, in random order,
on corral's throwaway server and on a server given with ``--corral-dsn``.

The apps (``tests/real_apps/``) are written here, modelled on common layouts: settings
from URL parts through pydantic-settings or an ``lru_cache``'d function, Alembic whose
``env.py`` reads the app's settings, a session-scoped ORM session, a sync ``TestClient``,
an asyncpg pool made in FastAPI's lifespan on a machine without psycopg.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests._inner import RUN_VARIABLES

APPS = Path(__file__).resolve().parents[1] / "real_apps"

#: Makes ``import psycopg`` fail, as on a machine where only asyncpg is installed.
_HIDE_PSYCOPG = """\
import sys


class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Hide())
"""

#: app -> (number of tests, whether psycopg is hidden)
CASES = {
    "sqlmodel_sync": (17, False),
    "async_parts": (7, False),
    "asyncpg_lifespan": (7, True),
}


def _clones(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'corral%' AND NOT datistemplate"
        ).fetchall()
    return {name for (name,) in rows}


def run_app(app: Path, *args: str, dsn: str | None, hide_psycopg: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES and not k.startswith("PG")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the apps' modules are compiled once, not per run
    if hide_psycopg:
        hider = app.parent / "hide-psycopg"
        hider.mkdir(exist_ok=True)
        (hider / "sitecustomize.py").write_text(_HIDE_PSYCOPG)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hider), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", *args]
    if dsn is not None:
        command.append(f"--corral-dsn={dsn}")
    result = subprocess.run(
        command, cwd=app, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("server", ["throwaway", "dsn"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_app_suite_passes(
    name: str, server: str, postgres_dsn: str, postgres_tcp_dsn: str, tmp_path: Path
) -> None:
    tests, hide = CASES[name]
    app = tmp_path / name
    shutil.copytree(APPS / name, app)
    # A URL with a host and a port: apps that build theirs from parts need one.
    dsn = postgres_tcp_dsn if server == "dsn" else None
    before = _clones(postgres_dsn)
    for workers, seed in (("0", 1), ("2", 2)):
        output = run_app(app, "-n", workers, f"--randomly-seed={seed}", dsn=dsn, hide_psycopg=hide)
        summary = re.search(r"=+ (\d+) passed(.*) in [\d.]+s", output)
        assert summary is not None, output[-6000:]
        assert int(summary.group(1)) == tests, output[-6000:]
    assert _clones(postgres_dsn) == before, "the app's runs left databases behind"
