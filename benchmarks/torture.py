"""Load and kill -9: many clients, mixed operations, holders killed, the broker killed.

Run: ``python -m benchmarks.torture [--clients 64] [--seconds 10] [--epochs 2] [--kills 8]``.

A broker runs in its own process (``corral broker``, as under ``corral run``). ``--clients``
forked processes loop over a mix of operations: ``incr`` (35 %), ``lock`` on one of four
names (25 %; one hold in ten lasts 200 ms, the rest up to 2 ms), ``acquire`` from a pool
of four items (20 %), ``once`` over 50 keys (10 %), ``set`` + ``get`` (10 %). During each
epoch, ``--kills`` / ``--epochs`` clients are killed with SIGKILL while they hold a lock
for long and replaced; the time until another client is granted that lock is the
*time to free*. Between epochs every client pauses, the counter is checked, and the
broker is killed with SIGKILL and started again at the same path; clients reconnect.

Checked: lost increments (acknowledged ``incr`` calls the counter does not show: must
be 0), duplicate fencing tokens (two grants of one lock with one token: 0), ``once``
callers that saw different values for one key (0). Printed: operations, errors by kind,
p50/p99 per operation, time to free, broker RSS at the start and end of each epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.sharedctypes
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = 4
POOL = ["db-0", "db-1", "db-2", "db-3"]
ONCE_KEYS = 50
LONG_HOLD = 0.2
OPS = ("incr", "lock", "acquire", "once", "set+get")


@dataclass
class Shared:
    """State shared with the forked clients (survives their kill -9)."""

    slots: int
    epochs: int

    def __post_init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Value("b", 0, lock=False)
        self.pause = ctx.Value("b", 0, lock=False)
        self.epoch = ctx.Value("i", 0, lock=False)
        self.parked = ctx.Array("b", self.slots, lock=False)
        self.holding = ctx.Array("i", self.slots, lock=False)  # lock index + 1 during a long hold
        self.acked = ctx.Array("q", self.epochs)  # acknowledged incr per epoch (with a lock)
        self.armed = ctx.Array("d", LOCKS)  # kill time of lock i's holder, 0 when none
        self.freed = ctx.Array("d", LOCKS)  # first grant of lock i after that


@dataclass
class Result:
    clients: int
    seconds: float
    epochs: int
    operations: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    lost_increments: int = 0
    unanswered_increments: int = 0
    duplicate_tokens: int = 0
    once_mismatches: int = 0
    kills: int = 0
    time_to_free: list[float] = field(default_factory=list)
    restart: list[float] = field(default_factory=list)
    rss: list[tuple[int, int]] = field(default_factory=list)  # (start, end) per epoch
    lost_reports: int = 0  # killed clients: their latencies are not counted


# ---------------------------------------------------------------------- clients (forked)


def client_loop(slot: int, path: str, shared: Shared, directory: str, seed: int) -> None:
    from corral.broker import Client
    from corral.errors import CorralError

    # "the broker restarted" is expected here, 64 times over.
    logging.getLogger("corral").setLevel(logging.ERROR)
    rng = random.Random(seed)
    latencies: dict[str, list[float]] = {op: [] for op in OPS}
    errors: Counter[str] = Counter()
    log = os.open(os.path.join(directory, f"grants-{slot}"), os.O_WRONLY | os.O_CREAT, 0o600)
    clock = time.perf_counter
    ops = 0
    with Client(path, timeout=10) as client:
        while not shared.stop.value:
            if shared.pause.value:
                shared.parked[slot] = 1
                while shared.pause.value and not shared.stop.value:
                    time.sleep(0.002)
                shared.parked[slot] = 0
                continue
            epoch = shared.epoch.value
            pick = rng.random()
            started = clock()
            op = "incr"
            try:
                if pick < 0.35:
                    client.incr(f"hits:{epoch}")
                    with shared.acked.get_lock():
                        shared.acked[epoch] += 1
                elif pick < 0.60:
                    op = "lock"
                    index = rng.randrange(LOCKS)
                    with client.lock(f"L{index}", timeout=3) as token:
                        now = clock()
                        latencies[op].append(now - started)
                        if shared.armed[index] and not shared.freed[index]:
                            shared.freed[index] = now
                        os.write(log, f"{epoch} L{index} {token}\n".encode())
                        if rng.random() < 0.1:
                            shared.holding[slot] = index + 1
                            time.sleep(LONG_HOLD)
                            shared.holding[slot] = 0
                        else:
                            time.sleep(rng.uniform(0, 0.002))
                elif pick < 0.80:
                    op = "acquire"
                    with client.acquire("P", timeout=3):
                        latencies[op].append(clock() - started)
                        time.sleep(rng.uniform(0, 0.002))
                elif pick < 0.90:
                    op = "once"
                    key = f"once:{epoch}:{rng.randrange(ONCE_KEYS)}"
                    value = client.once(key, lambda: f"{slot}-{os.getpid()}", ttl=600, timeout=5)
                    os.write(log, f"{epoch} {key} {value}\n".encode())
                else:
                    op = "set+get"
                    client.set(f"kv:{slot}", started, ttl=60)
                    client.get(f"kv:{slot}")
            except CorralError as exc:
                errors[f"{op}: {type(exc).__name__}"] += 1
            else:
                if op not in ("lock", "acquire"):
                    latencies[op].append(clock() - started)
            ops += 1
    os.close(log)
    report = {"ops": ops, "errors": dict(errors), "latencies": latencies}
    Path(directory, f"report-{slot}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------- parent


@contextlib.contextmanager
def broker_process(path: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "broker", "--no-require-ttl", "--socket", path],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != path:
            raise RuntimeError("the broker did not start")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _pause(shared: Shared, alive: dict[int, BaseProcess], timeout: float = 15.0) -> None:
    shared.pause.value = 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(shared.parked[slot] or not p.is_alive() for slot, p in alive.items()):
            return
        time.sleep(0.005)
    raise RuntimeError("clients did not pause")


def _kill_a_holder(
    shared: Shared, alive: dict[int, BaseProcess], result: Result, rng: random.Random
) -> int | None:
    """SIGKILL a client in a long lock hold; wait for the lock to go to another; its slot."""
    holders = [slot for slot in alive if shared.holding[slot]]
    if not holders:
        return None
    slot = rng.choice(holders)
    index = shared.holding[slot] - 1
    if index < 0:
        return None
    shared.freed[index] = 0.0
    killed_at = time.perf_counter()
    shared.armed[index] = killed_at
    os.kill(alive[slot].pid or 0, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not shared.freed[index] and time.monotonic() < deadline:
        time.sleep(0.0005)
    if shared.freed[index]:
        result.time_to_free.append(shared.freed[index] - killed_at)
    shared.armed[index] = 0.0
    result.kills += 1
    return slot


def run(clients: int, seconds: float, epochs: int, kills: int, seed: int = 1) -> Result:
    from corral.broker import Client

    rng = random.Random(seed)
    result = Result(clients, seconds, epochs)
    ctx = multiprocessing.get_context("fork")
    shared = Shared(clients + kills + 1, epochs)
    with tempfile.TemporaryDirectory(prefix="torture-", dir="/tmp") as directory:
        path = os.path.join(directory, "b.sock")
        alive: dict[int, BaseProcess] = {}
        next_slot = 0

        def spawn() -> None:
            nonlocal next_slot
            slot, next_slot = next_slot, next_slot + 1
            proc = ctx.Process(
                target=client_loop,
                args=(slot, path, shared, directory, rng.randrange(2**32)),
                daemon=True,
            )
            proc.start()
            alive[slot] = proc

        broker_cm = broker_process(path)
        broker = broker_cm.__enter__()
        try:
            with Client(path) as c:
                c.pool("P", POOL)
            for _ in range(clients):
                spawn()
            for epoch in range(epochs):
                shared.epoch.value = epoch
                start_rss = rss(broker.pid)
                shared.pause.value = 0
                per_epoch = kills // epochs + (1 if epoch < kills % epochs else 0)
                ends = time.monotonic() + seconds
                kill_at = [
                    time.monotonic() + seconds * (i + 1) / (per_epoch + 1) for i in range(per_epoch)
                ]
                while time.monotonic() < ends:
                    if kill_at and time.monotonic() >= kill_at[0]:
                        slot = _kill_a_holder(shared, alive, result, rng)
                        if slot is not None:
                            kill_at.pop(0)
                            alive.pop(slot).join(5)
                            result.lost_reports += 1
                            spawn()
                    time.sleep(0.002)
                _pause(shared, alive)
                with Client(path) as c:
                    counted = c.get(f"hits:{epoch}", 0)
                acked = shared.acked[epoch]
                result.lost_increments += max(0, acked - counted)
                result.unanswered_increments += max(0, counted - acked)
                result.rss.append((start_rss, rss(broker.pid)))
                if epoch + 1 < epochs:  # kill -9 the broker and start it again
                    broker.kill()
                    broker_cm.__exit__(None, None, None)
                    restarted = time.perf_counter()
                    broker_cm = broker_process(path)
                    broker = broker_cm.__enter__()
                    with Client(path) as c:
                        c.ping()
                        c.pool("P", POOL)
                    result.restart.append(time.perf_counter() - restarted)
            shared.stop.value = 1
            shared.pause.value = 0
            for proc in alive.values():
                proc.join(30)
        finally:
            shared.stop.value = 1
            for proc in alive.values():
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            broker_cm.__exit__(None, None, None)
        _collect(directory, result)
    return result


def _collect(directory: str, result: Result) -> None:
    grants: Counter[str] = Counter()
    onces: dict[str, set[str]] = {}
    result.latencies = {op: [] for op in OPS}
    for entry in sorted(os.listdir(directory)):
        file = os.path.join(directory, entry)
        if entry.startswith("report-"):
            report = json.loads(Path(file).read_text())
            result.operations += report["ops"]
            result.errors.update(report["errors"])
            for op, samples in report["latencies"].items():
                result.latencies[op] += samples
        elif entry.startswith("grants-"):
            for line in Path(file).read_text().splitlines():
                epoch, name, value = line.split(" ", 2)
                if name.startswith("L"):
                    grants[f"{epoch} {name} {value}"] += 1
                else:
                    onces.setdefault(f"{epoch} {name}", set()).add(value)
    result.duplicate_tokens = sum(n - 1 for n in grants.values() if n > 1)
    result.once_mismatches = sum(len(values) - 1 for values in onces.values())


def _ms(samples: list[float], q: float) -> str:
    if not samples:
        return "-"
    ordered = sorted(samples)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.2f}"


def report(result: Result) -> str:
    every = [s for samples in result.latencies.values() for s in samples]
    errors = sum(result.errors.values())
    free = result.time_to_free
    lines = [
        f"torture: {result.clients} clients, {result.epochs} epochs of {result.seconds:g} s, "
        f"{result.kills} holders killed (-9), broker killed (-9) and restarted "
        f"{len(result.restart)} time(s)",
        f"  {'operation':<28}{'n':>9}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    for op in OPS:
        samples = result.latencies.get(op, [])
        lines.append(f"  {op:<28}{len(samples):>9,}{_ms(samples, 0.5):>10}{_ms(samples, 0.99):>10}")
    lines.append(f"  {'all':<28}{len(every):>9,}{_ms(every, 0.5):>10}{_ms(every, 0.99):>10}")
    lines += [
        "",
        f"  {'check':<44}{'value':>12}",
        f"  {'operations (clients that survived)':<44}{result.operations:>12,}",
        f"  {'errors':<44}{errors:>12,}",
        f"  {'lost increments (must be 0)':<44}{result.lost_increments:>12}",
        f"  {'duplicate fencing tokens (must be 0)':<44}{result.duplicate_tokens:>12}",
        f"  {'once callers that saw another value (0)':<44}{result.once_mismatches:>12}",
        f"  {'incr applied but unanswered':<44}{result.unanswered_increments:>12}",
        f"  {'time to free after kill -9, median ms':<44}"
        f"{(f'{statistics.median(free) * 1000:.1f}' if free else '-'):>12}",
        f"  {'time to free after kill -9, max ms':<44}"
        f"{(f'{max(free) * 1000:.1f}' if free else '-'):>12}",
        f"  {'broker restart to first answer, ms':<44}"
        f"{(f'{max(result.restart) * 1000:.0f}' if result.restart else '-'):>12}",
    ]
    for epoch, (before, after) in enumerate(result.rss):
        label = f"broker RSS epoch {epoch + 1}, start -> end MiB"
        lines.append(f"  {label:<44}{f'{before / 2**20:.1f} -> {after / 2**20:.1f}':>12}")
    if result.errors:
        lines.append("  errors by kind: " + ", ".join(f"{k} {n}" for k, n in result.errors.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="client processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each epoch")
    parser.add_argument("--epochs", type=int, default=2, help="broker incarnations (kill -9)")
    parser.add_argument("--kills", type=int, default=8, help="lock holders killed in all")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.clients < 2 or args.epochs < 1 or args.seconds <= 0:
        parser.error("--clients >= 2, --epochs >= 1 and --seconds > 0")
    result = run(args.clients, args.seconds, args.epochs, args.kills, args.seed)
    print(report(result))
    bad = result.lost_increments or result.duplicate_tokens or result.once_mismatches
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
