"""What the corral plugin adds to a pytest run that uses none of it: one test, no database.

Run: ``python -m benchmarks.plugin_overhead [--rounds 7] [--workers 2]``. The plugin is
active in every pytest run of a virtualenv where corral is installed, so a suite that
never configured a database or a Redis broker pays its start-up too. This times whole
``pytest`` runs of a one-test suite, each in a fresh process, with the plugin and with
``-p no:corral``, rounds interleaved (machine load drifts alike over both), serially and
with ``-n`` workers (xdist), without a bytecode cache (``PYTHONDONTWRITEBYTECODE=1``:
every module is compiled again in every process, as in many Docker images and in source
checkouts) and with a warm one (``PYTHONPYCACHEPREFIX`` in a scratch directory). Median
milliseconds of the whole run, wall time and CPU time (the pytest process and its workers:
steadier than wall time on a busy machine); the difference is the plugin's cost.
Target (issue 18): at most 50 ms without a bytecode cache, serially.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 50.0
SUITE = "def test_nothing():\n    pass\n"


def _env(cache: Path | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORRAL_", "EPHEMERAL_", "PYTEST_", "DJANGO_"))
        and k not in ("DATABASE_URL", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    }
    # The corral of this checkout, whatever the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if cache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(suite: Path, env: dict[str, str], extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run (CPU: the pytest process and its xdist workers)."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    cpu = _cpu()
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=suite, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, _cpu() - cpu


def _stale_bytecode() -> list[Path]:
    """Bytecode next to corral's sources: it would be read even with the variable set."""
    return sorted((ROOT / "src" / "corral").rglob("__pycache__"))


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs per mode (median kept)")
    parser.add_argument("--workers", default="2", help="-n value for the xdist rows ('' for none)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    stale = _stale_bytecode()
    if stale:
        print(f"note: {len(stale)} __pycache__ directories under src/corral are read even "
              "without a bytecode cache; remove them for the uncached rows to mean it")  # fmt: skip
    layouts: list[tuple[str, list[str]]] = [("serial", [])]
    if args.workers and _has_xdist():
        layouts.append((f"-n {args.workers}", ["-n", args.workers]))
    with tempfile.TemporaryDirectory(prefix="corral-overhead-") as tmp:
        suite, cache = Path(tmp) / "suite", Path(tmp) / "pycache"
        suite.mkdir()
        (suite / "pytest.ini").write_text("[pytest]\n")
        (suite / "test_one.py").write_text(SUITE)
        caches: list[tuple[str, Path | None]] = [
            ("no bytecode cache", None),
            ("bytecode cached", cache),
        ]
        modes = [
            (layout, extra, label, where) for layout, extra in layouts for label, where in caches
        ]
        for _, extra, _, where in modes:  # warm-up: fills the cache, loads the disk cache
            for plugin in ([], ["-p", "no:corral"]):
                _run(suite, _env(where), [*extra, *plugin])
        times: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for layout, extra, label, where in modes:
                for active in (True, False):
                    plugin = [] if active else ["-p", "no:corral"]
                    sample = _run(suite, _env(where), [*extra, *plugin])
                    times.setdefault((layout, label, active), []).append(sample)
    print(f"# one-test suite, no database; median of {args.rounds} interleaved runs; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    print()
    width = 34
    header = ("corral ms", "no:corral ms", "difference ms", "corral cpu ms", "no:corral cpu ms",
              "cpu difference ms")  # fmt: skip
    print(f"{'run':<{width}}" + "".join(f"  {name:>{len(name)}}" for name in header))
    missed = []
    for layout, _, label, _ in modes:
        cells = []
        for index in (0, 1):  # wall, then CPU
            with_ms = statistics.median(s[index] for s in times[(layout, label, True)]) * 1000
            without = statistics.median(s[index] for s in times[(layout, label, False)]) * 1000
            cells.append((with_ms, without, with_ms - without))
        (wall_on, wall_off, wall_extra), (cpu_on, cpu_off, cpu_extra) = cells
        row = f"{layout}, {label}"
        values = (wall_on, wall_off, wall_extra, cpu_on, cpu_off, cpu_extra)
        print(
            f"{row:<{width}}"
            + "".join(f"  {v:>{len(n)}.0f}" for n, v in zip(header, values, strict=True))
        )
        if layout == "serial" and label == "no bytecode cache":
            missed = [n for n, v in (("wall", wall_extra), ("CPU", cpu_extra)) if v > TARGET_MS]
    print()
    print(
        f"target: serial, no bytecode cache, difference <= {TARGET_MS:.0f} ms: "
        + (f"missed ({' and '.join(missed)} time)" if missed else "met")
        + " (on a busy machine trust the CPU columns: wall time swings by seconds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
