"""Throwaway PostgreSQL: start (warm/cold), stop and clone times, side by side with the usual ways.

Run: ``python -m benchmarks.postgres_start [--rounds 10] [--png PATH]``. Compares corral's
``EphemeralPostgres`` with a plain ``initdb`` + ``pg_ctl start -w`` and, when installed,
``pgserver``'s own launcher; then template clones (FILE_COPY vs WAL_LOG) on a small schema.
Targets: warm start <= 0.5 s, stop <= 0.5 s, clone <= 50 ms (medians).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from corral.postgres import (
    EphemeralPostgres,
    clone_database,
    database_dsn,
    drop_database,
    ensure_template,
    find_binaries,
    resolve_server_user,
)
from corral.postgres._binaries import pgserver_bindir
from corral.postgres._cache import server_env

SCHEMA = """
CREATE TABLE users (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, created timestamptz
    NOT NULL DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES users,
    total numeric(10, 2) NOT NULL, status text NOT NULL DEFAULT 'new');
CREATE INDEX ON orders (user_id);
CREATE TABLE items (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders,
    sku text NOT NULL, qty int NOT NULL CHECK (qty > 0));
INSERT INTO users (email) SELECT 'user' || g || '@example.com' FROM generate_series(1, 200) g;
"""


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_corral(rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"start (warm)": [], "stop": [], "start (cold)": []}
    for _ in range(3):
        with tempfile.TemporaryDirectory() as cache:
            server = EphemeralPostgres(cache_dir=cache)
            results["start (cold)"].append(_time(server.start))
            server.stop()
    EphemeralPostgres().start().stop()  # make sure the default cache is warm
    for _ in range(rounds):
        server = EphemeralPostgres()
        results["start (warm)"].append(_time(server.start))
        results["stop"].append(_time(server.stop))
    return results


def bench_plain(rounds: int) -> dict[str, list[float]]:
    """What a hand-rolled fixture does: initdb into a temp dir, pg_ctl start -w, pg_ctl stop."""
    binaries = find_binaries()
    user = resolve_server_user()
    results: dict[str, list[float]] = {"start (cold)": [], "stop": []}
    for _ in range(min(rounds, 5)):
        base = Path(tempfile.mkdtemp(prefix="bench-plain-", dir="/tmp"))
        os.chmod(base, 0o755)
        user.chown(base)
        data = base / "data"
        kwargs = {"env": server_env(), "cwd": "/", "check": True, **user.popen_kwargs()}

        def start(data: Path = data, base: Path = base, kwargs: dict = kwargs) -> None:  # type: ignore[type-arg]
            subprocess.run(
                [str(binaries.initdb), "-D", str(data), "-U", "postgres", "-A", "trust",
                 "--no-sync"], capture_output=True, **kwargs,
            )  # fmt: skip
            subprocess.run(
                [str(binaries.bindir / "pg_ctl"), "start", "-w", "-D", str(data), "-l",
                 str(base / "log"), "-o", f"-k {base} -c listen_addresses='' -c fsync=off"],
                capture_output=True, **kwargs,
            )  # fmt: skip

        def stop(data: Path = data, kwargs: dict = kwargs) -> None:  # type: ignore[type-arg]
            subprocess.run(
                [str(binaries.bindir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)],
                capture_output=True, **kwargs,
            )  # fmt: skip

        results["start (cold)"].append(_time(start))
        results["stop"].append(_time(stop))
        shutil.rmtree(base, ignore_errors=True)
    return results


def bench_pgserver(rounds: int) -> dict[str, list[float]] | None:
    if pgserver_bindir() is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Through importlib: pgserver is optional and its stubs differ by version.
        get_server = importlib.import_module("pgserver").get_server

    results: dict[str, list[float]] = {"start (cold)": [], "stop": [], "start (warm)": []}
    base = Path(tempfile.mkdtemp(prefix="bench-pgserver-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        for i in range(min(rounds, 3)):
            pgdata = base / f"d{i}"
            started = time.perf_counter()
            handle: Any = get_server(pgdata, cleanup_mode="stop")
            results["start (cold)"].append(time.perf_counter() - started)
            results["stop"].append(_time(handle.cleanup))
            # Restarting on the same, already initialised data directory.
            started = time.perf_counter()
            handle = get_server(pgdata, cleanup_mode="stop")
            results["start (warm)"].append(time.perf_counter() - started)
            handle.cleanup()
    except Exception as exc:  # a launcher we do not own: report, do not crash the benchmark
        print(f"pgserver's launcher failed here: {type(exc).__name__}: {exc}")
        return results if results["start (cold)"] else None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def bench_clones(rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        "clone FILE_COPY": [],
        "clone WAL_LOG": [],
        "drop": [],
        "drop, 2 sessions open": [],
    }
    with EphemeralPostgres() as server, tempfile.TemporaryDirectory() as tmp:
        schema = Path(tmp) / "schema.sql"
        schema.write_text(SCHEMA)
        template = ensure_template(server.dsn, [schema])
        names = []
        for _ in range(rounds * 3):
            started = time.perf_counter()
            names.append(clone_database(server.dsn, template))
            results["clone FILE_COPY"].append(time.perf_counter() - started)
        for i, name in enumerate(names):
            # Every other clone still has an application's pool on it (the end of a run,
            # or a no_sandbox test's database being recreated).
            held = i % 2 == 1
            sessions = [psycopg.connect(database_dsn(server.dsn, name)) for _ in range(2 * held)]
            started = time.perf_counter()
            drop_database(server.dsn, name)
            results["drop, 2 sessions open" if held else "drop"].append(
                time.perf_counter() - started
            )
            for session in sessions:
                session.close()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            for i in range(rounds * 3):
                started = time.perf_counter()
                conn.execute(f'CREATE DATABASE "wal_{i}" TEMPLATE "{template}" STRATEGY WAL_LOG')
                results["clone WAL_LOG"].append(time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--pgserver", action="store_true", help="also time pgserver's launcher when root"
    )
    parser.add_argument("--png", help="also draw the medians into this PNG (needs matplotlib)")
    args = parser.parse_args()

    binaries = find_binaries()
    print(f"PostgreSQL {binaries.version_string} from {binaries.bindir}; {os.cpu_count()} CPUs")
    rows: dict[str, dict[str, list[float]]] = {
        "corral": bench_corral(args.rounds),
        "initdb + pg_ctl": bench_plain(args.rounds),
    }
    if os.geteuid() == 0 and not args.pgserver:
        # Run as root, pgserver's launcher adds o+rx to every parent directory of its
        # install (/root included) so its user can reach the binaries: opt in explicitly.
        print("skipping pgserver's launcher as root (it chmods /root); --pgserver to include")
    else:
        wheel = bench_pgserver(args.rounds)
        if wheel is not None:
            rows["pgserver"] = wheel
    rows["clones (corral)"] = bench_clones(args.rounds)

    print(f"\n{'launcher':<18}{'operation':<23}{'median ms':>10}{'min ms':>9}{'n':>5}")
    for launcher, results in rows.items():
        for operation, samples in results.items():
            if samples:
                print(
                    f"{launcher:<18}{operation:<23}{_median_ms(samples):>10.1f}"
                    f"{min(samples) * 1000:>9.1f}{len(samples):>5}"
                )
    corral = rows["corral"]
    warm = _median_ms(corral["start (warm)"])
    print("\nratios (median, higher = corral faster):")
    for other in ("initdb + pg_ctl", "pgserver"):
        if other in rows and rows[other]["start (cold)"]:
            cold_other = _median_ms(rows[other]["start (cold)"])
            print(f"  {other} cold start / corral warm start: {cold_other / warm:.1f}x")
            print(
                f"  {other} stop / corral stop: "
                f"{_median_ms(rows[other]['stop']) / _median_ms(corral['stop']):.1f}x"
            )
        if other in rows and rows[other].get("start (warm)"):
            print(
                f"  {other} restart / corral warm start: "
                f"{_median_ms(rows[other]['start (warm)']) / warm:.1f}x"
            )
    clones = rows["clones (corral)"]
    print(
        "  WAL_LOG clone / FILE_COPY clone: "
        f"{_median_ms(clones['clone WAL_LOG']) / _median_ms(clones['clone FILE_COPY']):.1f}x"
    )
    print(
        f"\ntargets: warm start {warm:.0f} ms (<= 500), stop {_median_ms(corral['stop']):.0f} ms "
        f"(<= 500), clone {_median_ms(clones['clone FILE_COPY']):.0f} ms (<= 50)"
    )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, values = [], []
        for launcher, results in rows.items():
            for operation, samples in results.items():
                if samples:
                    labels.append(f"{launcher}\n{operation}")
                    values.append(_median_ms(samples))
        fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.9), 4.5))
        ax.bar(range(len(values)), values)
        ax.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_yscale("log")
        ax.set_title("throwaway PostgreSQL: start / stop / clone")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
