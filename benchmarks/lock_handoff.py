"""Lock handoff between processes: release in one, acquire in another, side by side.

Run: ``python -m benchmarks.lock_handoff [--handoffs 200] [--hold-ms 2] [--rows corral,flock]``.

Two worker processes take turns on one lock: each holds it ``--hold-ms`` (so the other
is surely waiting), stamps the time and releases; the other records how long after the
stamp it got the lock. Rows: ``fcntl.flock`` (the kernel wakes the waiter: the floor),
corral's ``Client.lock`` (a broker in its own process, as under ``corral run``),
``filelock.FileLock`` (polls every 50 ms by default, and at 1 ms), and redis-py's ``Lock``
against a redis-server started on a temporary Unix socket when the binary exists
(polls every 100 ms by default, and at 1 ms). Target: corral median <= 0.2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# released_at (perf_counter: CLOCK_MONOTONIC, shared by processes on Linux), releaser, holder
_STAMP = struct.Struct("dqq")

LABELS = {
    "flock": "fcntl.flock (kernel wake-up, floor)",
    "corral": "corral Client.lock",
    "filelock": "filelock.FileLock (poll 50 ms)",
    "filelock-1ms": "filelock.FileLock (poll 1 ms)",
    "redis-py": "redis-py Lock (sleep 100 ms)",
    "redis-py-1ms": "redis-py Lock (sleep 1 ms)",
}


# ---------------------------------------------------------------------- workers (child side)


def _locker(kind: str, address: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if kind == "flock":
        fd = os.open(address, os.O_RDWR | os.O_CREAT, 0o600)

        @contextlib.contextmanager
        def flock() -> Iterator[None]:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

        return flock
    if kind == "corral":
        from corral.broker import Client

        client = Client(address)
        return lambda: client.lock("handoff", timeout=60)
    if kind.startswith("filelock"):
        from filelock import FileLock

        interval = 0.001 if kind.endswith("1ms") else 0.05
        lock = FileLock(address)
        return lambda: lock.acquire(timeout=60, poll_interval=interval)
    import redis

    r = redis.Redis(unix_socket_path=address)
    sleep = 0.001 if kind.endswith("1ms") else 0.1
    return lambda: r.lock("handoff", timeout=60, sleep=sleep, blocking_timeout=60)


def worker(kind: str, address: str, stamp: str, n: int, hold: float, start: float) -> None:
    """Take the lock *n* times, each time after the other process took it."""
    clock, me = time.perf_counter, os.getpid()
    fd = os.open(stamp, os.O_RDWR)
    lock = _locker(kind, address)
    with lock():  # connect / open files before the common start
        pass
    time.sleep(max(0.0, start - clock()))
    samples: list[float] = []
    for _ in range(n):
        with lock():
            acquired = clock()
            released, releaser, _ = _STAMP.unpack(os.pread(fd, _STAMP.size, 0))
            if releaser not in (0, me):
                samples.append(acquired - released)
            os.pwrite(fd, _STAMP.pack(released, releaser, me), 0)
            time.sleep(hold)  # the other process queues (or polls) meanwhile
            os.pwrite(fd, _STAMP.pack(clock(), me, me), 0)
        # Strict turns: wait until the other process got it, so every take is a handoff.
        deadline = clock() + 5
        while _STAMP.unpack(os.pread(fd, _STAMP.size, 0))[2] == me and clock() < deadline:
            time.sleep(0.0002)
    os.pwrite(fd, _STAMP.pack(clock(), me, 0), 0)  # let the other finish its last turn
    print(json.dumps(samples))


# ---------------------------------------------------------------------- parent


@contextlib.contextmanager
def corral_broker() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "broker", "--no-require-ttl"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def redis_server(directory: str) -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        binary = None
    if binary is None:
        yield None
        return
    path = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(unix_socket_path=path).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield path
    finally:
        proc.kill()
        proc.wait()


def run_pair(kind: str, address: str, n: int, hold: float, directory: str) -> list[float]:
    stamp = os.path.join(directory, f"stamp-{kind}")
    with open(stamp, "wb") as f:
        f.write(_STAMP.pack(0.0, 0, 0))
    start = time.perf_counter() + 1.5  # both import and connect first
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.lock_handoff",
                "--worker",
                kind,
                address,
                stamp,
                str(n),
                str(hold),
                str(start),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    samples: list[float] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} worker failed ({proc.returncode})")
        samples += json.loads(out)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handoffs", type=int, default=200, help="takes per process")
    parser.add_argument("--hold-ms", type=float, default=2.0, help="time each take holds")
    parser.add_argument("--polling-handoffs", type=int, default=40, help="for 50/100 ms pollers")
    parser.add_argument(
        "--rows", default=",".join(LABELS), help=f"comma-separated subset of {','.join(LABELS)}"
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, address, stamp, n, hold, start = args.worker
        worker(kind, address, stamp, int(n), float(hold), float(start))
        return
    hold = args.hold_ms / 1000
    rows = set(args.rows.split(",")) | {"corral"}
    results: dict[str, list[float]] = {}

    def takes(kind: str) -> int:  # the slow pollers take 50-100 ms per handoff
        return int(args.polling_handoffs if kind in ("filelock", "redis-py") else args.handoffs)

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        with corral_broker() as path:
            results["corral"] = run_pair("corral", path, args.handoffs, hold, directory)
        if "flock" in rows:
            lockfile = os.path.join(directory, "flock")
            results["flock"] = run_pair("flock", lockfile, args.handoffs, hold, directory)
        try:
            import filelock  # noqa: F401
        except ImportError:
            print("filelock not installed: skipping its rows", file=sys.stderr)
        else:
            lockfile = os.path.join(directory, "file.lock")
            for kind in ("filelock-1ms", "filelock"):
                if kind in rows:
                    results[kind] = run_pair(kind, lockfile, takes(kind), hold, directory)
        if rows & {"redis-py", "redis-py-1ms"}:
            with redis_server(directory) as redis_path:
                if redis_path is None:
                    print("redis-server or redis-py not available: skipping", file=sys.stderr)
                else:
                    for kind in ("redis-py-1ms", "redis-py"):
                        if kind in rows:
                            results[kind] = run_pair(kind, redis_path, takes(kind), hold, directory)
    corral = statistics.median(results["corral"])
    print(f"lock handoff between two processes (release -> acquire), milliseconds; "
          f"holds of {args.hold_ms} ms, strict turns")  # fmt: skip
    print(f"  {'lock':38} {'median':>9} {'p90':>9} {'n':>5}  vs corral")
    for kind in ("flock", "corral", "filelock-1ms", "filelock", "redis-py-1ms", "redis-py"):
        values = results.get(kind)
        if not values:
            continue
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        print(
            f"  {LABELS[kind]:38} {median * 1e3:9.3f} {p90 * 1e3:9.3f} {len(values):5}"
            f"  {median / corral:8.1f}x"
        )
    verdict = "met" if corral <= 0.0002 else "NOT met"
    print(f"target corral median <= 0.2 ms: {verdict} ({corral * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
