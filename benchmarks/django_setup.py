"""Django set-up time: pytest-django alone vs with corral, by number of migrations.

Run: ``python -m benchmarks.django_setup [--sizes 10,50,200] [--workers 0,2] [--dsn DSN]``.
Generates the Django project of ``tests/plugin/_django_project.py`` (3 apps, small
migrations, a data migration, 12 pytest-django tests) with about 10, 50 and 200
migrations, and times whole ``pytest`` runs of it, each in a fresh process: pytest-django
alone (``-p no:corral``: every worker creates and migrates its own test database, every
run) and with corral (the run migrates once into a template, which the next run reuses),
serial and with xdist, a first and a second run. Both use the same server: a throwaway
PostgreSQL started here (or ``--dsn``), which the project's settings name as their own.

Columns: time to first test (from launching pytest to the first test's call, after its
fixtures, so the test database set-up counts whichever process pays it) and wall time.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from corral.postgres import EphemeralPostgres

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.plugin._django_project import write_project  # noqa: E402

_CONFTEST = """\
import os
import time

_DONE = []


def pytest_runtest_call(item):
    if not _DONE:
        _DONE.append(1)
        with open(os.path.join(os.path.dirname(__file__), "first_test.txt"), "a") as f:
            f.write(f"{time.time()}\\n")
"""
# Tests that check corral's clone names, which pytest-django alone does not make.
_DESELECT = "not on_a_clone and not blocker"


def _project(root: Path, migrations: int) -> None:
    per_app = max(2, (migrations - 4) // 3)
    write_project(root, token=secrets.token_hex(6), migrations=per_app)
    (root / "conftest.py").write_text(_CONFTEST)


def _run(root: Path, env: dict[str, str], *args: str) -> tuple[float, float]:
    first = root / "first_test.txt"
    first.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    started = time.time()
    result = subprocess.run(
        [*command, "-k", _DESELECT, *args], cwd=root, env=env, capture_output=True, text=True
    )
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{result.stdout[-3000:]}")
    to_first = min(float(x) for x in first.read_text().split()) - started
    return to_first, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--dsn", default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    server = None if args.dsn else EphemeralPostgres().start()
    dsn = args.dsn or server.dsn  # type: ignore[union-attr]
    params = conninfo_to_dict(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CORRAL_", "EPHEM"))}
    env.update(
        DJ_HOST=str(params.get("host", "")),
        DJ_PORT=str(params.get("port", "5432")),
        DJ_USER=str(params.get("user", "postgres")),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    print(f"{'case':<44}  {'to first test':>13}  {'wall':>8}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                for n in workers:
                    for mode in ("pytest-django", "corral"):
                        root = Path(tmp) / f"p{size}-{n}-{mode}"
                        _project(root, size)
                        extra = ["-p", "no:corral"] if mode == "pytest-django" else []
                        for run in ("first", "second"):
                            to_first, wall = _run(root, env, "-n", str(n), *extra)
                            label = f"{size} migrations, -n {n}, {mode}, {run} run"
                            print(f"{label:<44}  {to_first:>11.2f} s  {wall:>6.2f} s", flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
