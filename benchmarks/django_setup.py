"""Django set-up time: pytest-django alone vs with corral, by number of migrations.

Run: ``python -m benchmarks.django_setup [--sizes 10,50,200] [--workers 0,4] [--repeat 3]
[--throwaway] [--dsn DSN] [--modes pytest-django,corral] [--kind typical|cheap]``.
Generates the Django project of ``tests/plugin/_django_project.py`` (3 apps, a data
migration, 12 pytest-django tests) with about 10, 50 and 200 migrations — ``typical``
(default): of the kind real projects have, a third creating a model with a foreign key and
an index, the rest adding fields, which Django migrates by rendering model states;
``cheap``: mostly ``RunSQL("SELECT n")``, next to free, so what remains is corral's and
pytest-django's fixed cost — and times whole ``pytest`` runs
of it, each in a fresh process: pytest-django alone (``-p no:corral``: every worker
creates and migrates its own test database, every run) and with corral (the run migrates
once into a template, which the next run reuses), serial and with xdist, a first and a
second run. Both use the same server: a throwaway PostgreSQL started here (or ``--dsn``),
which the project's settings name as their own. ``--throwaway``: the settings name a port
where nothing listens instead, so corral starts its own server and keeps its data
directory, template inside, for the next run (pytest-django alone cannot run so).

Columns (medians of ``--repeat`` runs, each first run on a freshly generated project; the
cases run interleaved, attempt by attempt, so load swings hit them alike):

- ``to first test``: what the user waits for, from launching pytest to the first test's
  call (after its fixtures: the ``pytest_runtest_call`` of whichever process runs a test
  first);
- ``db set-up``: that minus the median ``to first test`` of the same size and ``-n`` with
  no database at all (pytest-django alone, ``-k test_no_db``: Python, pytest, Django and
  xdist start-up, collection), so what remains is what the database costs before the
  first test, whichever process pays it (median, and min-max of the runs);
- ``after collection``: from the moment the last process finished collecting to the first
  test's call, minus the same for the no-database run (median, min-max): the time the
  database holds the run back once the processes are ready. Unlike ``db set-up`` it does
  not move with how fast the workers happened to boot (a -n 4 run's boot spreads by
  +-0.3-0.6 s on 2 cores), but it does not see what a build overlapping the boot costs
  the boot (CPU taken from the booting workers): read the two together;
- ``wall``.

Targets (printed at the end, by both measures): a first run with ``-n 4`` spends at most
1.2x the migration time of pytest-django's ``-n 0`` first run (its ``after collection``:
it migrates in the first test's set-up); a second run <= 0.5 s of db set-up at any size.
Note: corral ``-n 0`` builds and clones before collection, so its ``after collection``
does not see them: read its ``db set-up``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
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
_HERE = os.path.dirname(__file__)


def _stamp(name):
    with open(os.path.join(_HERE, name), "a") as f:
        f.write(f"{time.time()}\\n")


def pytest_collection_finish(session):
    _stamp("collected.txt")


def pytest_runtest_call(item):
    if not _DONE:
        _DONE.append(1)
        _stamp("first_test.txt")
"""
# Tests that check corral's clone names, which pytest-django alone does not make.
_DESELECT = "not on_a_clone and not blocker and not no_db"
# The start-up baseline: a test that uses no database.
_NO_DB = "def test_no_db():\n    pass\n"


#: The projects generated, whose kept servers and dumps go at the end.
_PROJECTS: list[Path] = []


def _forget_caches() -> None:
    """Remove what corral kept for the generated projects (their directories are gone)."""
    from corral._plugin._django_cache import dump_project
    from corral.postgres._cache import cache_root

    for root in _PROJECTS:
        for aliases in (["default"], ["default", "replica"]):
            for path in (cache_root() / "django").glob(f"{dump_project(root, aliases)}-*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _project(root: Path, migrations: int, typical: bool) -> None:
    _PROJECTS.append(root)
    per_app = max(2, (migrations - 4) // 3)
    write_project(root, token=secrets.token_hex(6), migrations=per_app, typical=typical)
    (root / "conftest.py").write_text(_CONFTEST)
    (root / "tests" / "test_no_db.py").write_text(_NO_DB)


def _run(
    root: Path, env: dict[str, str], *args: str, select: str = _DESELECT
) -> tuple[float, float, float]:
    """One pytest run: (launch to first test, last collection to first test, wall)."""
    first, collected = root / "first_test.txt", root / "collected.txt"
    first.unlink(missing_ok=True)
    collected.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    started = time.time()
    result = subprocess.run(
        [*command, "-k", select, *args], cwd=root, env=env, capture_output=True, text=True
    )
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{result.stdout[-3000:]}")
    first_test = min(float(x) for x in first.read_text().split())
    # xdist hands out the first test once every worker has collected: what passes after
    # the last collection is what the database holds the run back, boot variance aside.
    last_collected = max(float(x) for x in collected.read_text().split())
    return first_test - started, first_test - last_collected, wall


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _targets(
    verdict: dict[tuple[int, int, str], tuple[float, float]], sizes: list[int], workers: list[int]
) -> None:
    """Print the issue's two targets against what was measured, by both measures."""
    print("\ntargets (db set-up / after collection):")
    for size in sizes:
        single = verdict.get((size, 0, "pytest-django, first run"))
        for n in workers:
            first = verdict.get((size, n, "corral, first run"))
            second = verdict.get((size, n, "corral, second run"))
            if n > 0 and first is not None and single is not None:
                # pytest-django -n 0 migrates after collection, in the test's set-up: its
                # "after collection" is its migration time, boot variance aside.
                ratios = " / ".join(f"{x / single[1]:.2f}x" for x in first)
                print(
                    f"  {size} migrations: corral -n {n} first run vs pytest-django -n 0's "
                    f"{single[1]:.2f} s: {ratios} (target <= 1.2x)"
                )
            if second is not None:
                figures = " / ".join(f"{x:.2f} s" for x in second)
                print(f"  {size} migrations: corral -n {n} second run: {figures} (target <= 0.5 s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--workers", default="0,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--throwaway", action="store_true")
    parser.add_argument("--dsn", default=None)
    parser.add_argument(
        "--modes", default="pytest-django,corral", help="which of pytest-django,corral to run"
    )
    parser.add_argument("--kind", choices=("typical", "cheap"), default="typical")
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
    corral_env = dict(env, DJ_PORT="1") if args.throwaway else env
    modes = [m for m in args.modes.split(",") if m]
    if args.throwaway:
        modes = [m for m in modes if m == "corral"]
    typical = args.kind == "typical"
    print(
        f"{args.kind} migrations; load average {os.getloadavg()[0]:.1f}, "
        f"medians of {args.repeat} (min-max)"
    )
    header = f"{'case':<44}  {'to first test':>13}  {'db set-up':>16}"
    print(f"{header}  {'after collection':>16}  {'wall':>8}")
    verdict: dict[tuple[int, int, str], tuple[float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                for n in workers:
                    # Interleaved: each attempt runs every case once, so the machine's load
                    # swings spread over all of them alike.
                    base: list[tuple[float, float, float]] = []
                    times: dict[str, list[tuple[float, float, float]]] = {}
                    for attempt in range(args.repeat):
                        root = Path(tmp) / f"p{size}-{n}-base-{attempt}"
                        _project(root, size, typical)
                        base.append(
                            _run(root, env, "-n", str(n), "-p", "no:corral", select="no_db")
                        )
                        for mode in modes:
                            extra = ["-p", "no:corral"] if mode == "pytest-django" else []
                            mode_env = corral_env if mode == "corral" else env
                            root = Path(tmp) / f"p{size}-{n}-{mode}-{attempt}"
                            _project(root, size, typical)
                            for run in ("first", "second"):
                                times.setdefault(f"{mode}, {run} run", []).append(
                                    _run(root, mode_env, "-n", str(n), *extra)
                                )
                    baseline = _median([b[0] for b in base])
                    base_after = _median([b[1] for b in base])
                    label = f"{size} migrations, -n {n}, no database"
                    spread = _spread([b[0] for b in base])
                    after = f"{base_after:.2f}"
                    print(
                        f"{label:<44}  {baseline:>11.2f} s  {spread:>16}  {after:>16}  {'-':>8}",
                        flush=True,
                    )
                    for case, runs in times.items():
                        setup = [r[0] - baseline for r in runs]
                        held = [r[1] - base_after for r in runs]
                        medians = verdict[(size, n, case)] = (_median(setup), _median(held))
                        to_first = _median([r[0] for r in runs])
                        wall = _median([r[2] for r in runs])
                        label = f"{size} migrations, -n {n}, {case}"
                        text = f"{medians[0]:.2f} ({_spread(setup)})"
                        after = f"{medians[1]:.2f} ({_spread(held)})"
                        print(
                            f"{label:<44}  {to_first:>11.2f} s  {text:>16}  {after:>16}  "
                            f"{wall:>6.2f} s",
                            flush=True,
                        )
        _targets(verdict, sizes, workers)
    finally:
        _forget_caches()
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
