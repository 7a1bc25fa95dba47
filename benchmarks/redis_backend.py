"""corral's Redis backend side by side with plain redis-py and the Unix-socket broker.

Run: ``python -m benchmarks.redis_backend [--ops 2000] [--rounds 3] [--handoffs 300]``.

1. Round trips from a separate process, median microseconds per operation: redis-py's
   plain commands (the floor for anything on Redis), corral's ``RedisClient`` over the same
   Unix socket and over TCP on localhost, and corral's socket ``Client`` (every operation
   its class has). Rounds are interleaved so machine noise hits every row alike.
2. The cost of the Lua scripts inside Redis: ``INFO commandstats`` microseconds per call
   of each corral script against the plain command doing the same single-key work.
3. Lock handoff between two processes (release in one -> acquire in the other), median:
   corral on Redis (a push woken BLPOP), corral's socket broker when it has ``lock``, and
   redis-py's ``Lock`` (which polls, every 0.1 s by default; also shown at 1 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.broker.redis._flows import Script

ROOT = Path(__file__).resolve().parent.parent
OPS = ("ping", "get", "set", "incr", "add", "lock", "once", "push+pop")
_STAMP = struct.Struct("dI")


# ---------------------------------------------------------------------- workers (child side)


def _time(calls: dict[str, Callable[[], Any]], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    clock = time.perf_counter
    for op, fn in calls.items():
        for _ in range(max(n // 10, 50)):
            fn()
        samples = []
        for _ in range(n):
            started = clock()
            fn()
            samples.append(clock() - started)
        out[op] = samples
    return out


def _redis_py_calls(url: str) -> dict[str, Callable[[], Any]]:
    import redis

    r = redis.Redis.from_url(url)
    r.set("k", '"value"')
    noop = r.register_script("return 1")

    def lock() -> None:
        with r.lock("bench-lock", timeout=60):
            pass

    def push_pop() -> None:
        r.rpush("q", '"x"')
        r.blpop(["q"], timeout=1)

    return {
        "ping": r.ping,
        "get": lambda: r.get("k"),
        "set": lambda: r.set("k", '"value"', px=60_000),
        "incr": lambda: r.incr("n"),
        "add": lambda: r.set("a", "1", px=60_000, nx=True),
        "lock": lock,
        "push+pop": push_pop,
        "evalsha noop": lambda: noop(),
    }


def _corral_calls(client: Any) -> dict[str, Callable[[], Any]]:
    client.set("k", "value", ttl=600)
    calls: dict[str, Callable[[], Any]] = {
        "ping": client.ping,
        "get": lambda: client.get("k"),
        "set": lambda: client.set("k", "value", ttl=60),
    }
    if hasattr(client, "incr"):
        calls["incr"] = lambda: client.incr("n")
    if hasattr(client, "add"):
        calls["add"] = lambda: client.add("a", 1, ttl=60)
    if hasattr(client, "lock"):

        def lock() -> None:
            with client.lock("bench-lock"):
                pass

        calls["lock"] = lock
    if hasattr(client, "once"):
        client.once("o", lambda: "computed")
        calls["once"] = lambda: client.once("o", lambda: "computed")
    if hasattr(client, "push"):

        def push_pop() -> None:
            client.push("q", "x")
            client.pop("q", timeout=1)

        calls["push+pop"] = push_pop
    return calls


def _client(kind: str, address: str, run_id: str) -> Any:
    if kind == "socket":
        from corral.broker import Client

        return Client(address)
    from corral.broker.redis import RedisClient

    return RedisClient(address, run_id=run_id)


def worker_roundtrip(kind: str, address: str, run_id: str, n: int) -> None:
    if kind == "redis-py":
        calls = _redis_py_calls(address)
    else:
        calls = _corral_calls(_client(kind, address, run_id))
    print(json.dumps(_time(calls, n)))


def worker_handoff(kind: str, address: str, run_id: str, n: int, stamp: str, start: float) -> None:
    """Take the lock *n* times; each time the other process held it last, record how long
    ago it started releasing (CLOCK_MONOTONIC is shared by processes on Linux)."""
    clock, me = time.perf_counter, os.getpid()
    fd = os.open(stamp, os.O_RDWR)
    if kind.startswith("redis-py"):
        import redis

        r = redis.Redis.from_url(address)
        sleep = 0.1 if kind == "redis-py" else 0.001

        def lock() -> Any:
            return r.lock("handoff", timeout=60, sleep=sleep)
    else:
        client = _client(kind, address, run_id)

        def lock() -> Any:
            return client.lock("handoff", timeout=60)

    with lock():  # connect (and register the session) before the start line
        pass
    time.sleep(max(0.0, start - clock()))  # both processes start together
    samples = []
    for _ in range(n):
        with lock():
            acquired = clock()
            released, pid = _STAMP.unpack(os.pread(fd, _STAMP.size, 0))
            if pid not in (0, me):
                samples.append(acquired - released)
            os.pwrite(fd, _STAMP.pack(clock(), me), 0)
    print(json.dumps(samples))


# ---------------------------------------------------------------------- parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str, str]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    path, port = os.path.join(directory, "redis.sock"), _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", path,
         "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    unix, tcp = f"unix://{path}", f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(unix).ping()
            return proc, unix, tcp
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def start_broker(directory: str) -> tuple[subprocess.Popen[str], str]:
    path = os.path.join(directory, "corral.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "broker", "--no-require-ttl", "--socket", path],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, path


def _worker(*args: object) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.redis_backend", "--worker", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


def lua_cost(unix: str, n: int) -> list[tuple[str, float, str, float]]:
    """Server-side microseconds per call: each corral script vs the plain command."""
    import redis

    from corral.broker.redis import RedisClient

    r = redis.Redis.from_url(unix, decode_responses=True)
    client = RedisClient(unix, run_id=f"lua-{uuid.uuid4().hex[:8]}")
    client.set("k", 1, ttl=600)

    def per_call(fn: Callable[[], Any], command: str) -> float:
        fn()
        r.config_resetstat()
        for _ in range(n):
            fn()
        stats = r.info("commandstats").get(f"cmdstat_{command}", {})
        return float(stats.get("usec_per_call", 0.0))

    def lock() -> None:
        with client.lock("l"):
            pass

    noop = r.register_script("return 1")
    rows = [
        ("EVALSHA of `return 1` (fixed cost)", per_call(lambda: noop(), "evalsha"),
         "PING", per_call(lambda: r.ping(), "ping")),
        ("set (kv_set)", per_call(lambda: client.set("k", 1, ttl=60), "evalsha"),
         "SET PX", per_call(lambda: r.set("k", "1", px=60_000), "set")),
        ("add (set NX)", per_call(lambda: client.add("a", 1, ttl=60), "evalsha"),
         "SET NX PX", per_call(lambda: r.set("a", "1", px=60_000, nx=True), "set")),
        ("incr", per_call(lambda: client.incr("n"), "evalsha"),
         "INCRBY", per_call(lambda: r.incr("n"), "incrby")),
        ("lock: acquire + unhold (2 calls)", per_call(lock, "evalsha") * 2,
         "SET NX PX + DEL", per_call(lambda: r.set("l", "1", px=60_000, nx=True), "set")
         + per_call(lambda: r.delete("l"), "del")),
        ("once (value ready)", per_call(lambda: client.once("o", lambda: 1), "evalsha"),
         "GET", per_call(lambda: r.get("k"), "get")),
    ]  # fmt: skip
    # One heartbeat (beat + reap), what every client with claims pays each session_ttl / 3.
    sid = client._session.current()
    beat = per_call(lambda: client._execute(Script("session", client._session_args(sid, "beat"))),
                    "evalsha")  # fmt: skip
    rows.append(("heartbeat (beat + reap)", beat, "-", 0.0))
    client.purge()
    client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="timed calls per op per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    parser.add_argument("--handoffs", type=int, default=300, help="lock takes per process")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        role, kind, address, run_id, n, *rest = args.worker
        if role == "roundtrip":
            worker_roundtrip(kind, address, run_id, int(n))
        else:
            worker_handoff(kind, address, run_id, int(n), rest[0], float(rest[1]))
        return

    directory = tempfile.mkdtemp(prefix="corral-bench-")
    redis_proc, unix, tcp = start_redis(directory)
    broker, broker_path = start_broker(directory)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    rows = {
        "redis-py": ("redis-py, plain commands (unix)", unix),
        "redis-unix": ("corral RedisClient (unix)", unix),
        "redis-tcp": ("corral RedisClient (tcp localhost)", tcp),
        "socket": ("corral socket Client", broker_path),
    }
    samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in rows}
    handoffs: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for kind, (_, address) in rows.items():
                result = _worker("roundtrip", kind, address, run_id, args.ops)
                for op, values in result.items():
                    samples[kind].setdefault(op, []).extend(values)
        lua = lua_cost(unix, args.ops)
        from corral.broker import Client

        handoff_rows = {"redis-unix": unix, "redis-py": unix, "redis-py-1ms": unix}
        if hasattr(Client, "lock"):
            handoff_rows["socket"] = broker_path
        for kind, address in handoff_rows.items():
            stamp = os.path.join(directory, f"stamp-{kind}")
            with open(stamp, "wb") as f:
                f.write(_STAMP.pack(0.0, 0))
            start = time.perf_counter() + 3.0  # after both have imported and connected
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.redis_backend",
                        "--worker",
                        "handoff",
                        kind,
                        address,
                        run_id,
                        str(args.handoffs),
                        stamp,
                        str(start),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
                for _ in range(2)
            ]
            handoffs[kind] = [s for p in procs for s in json.loads(p.communicate()[0])]
    finally:
        broker.terminate()
        broker.wait()
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(directory, ignore_errors=True)

    ops = [op for op in (*OPS, "evalsha noop") if any(op in s for s in samples.values())]
    print(f"\nmedian round trip from another process, microseconds ({args.rounds} x {args.ops})")
    print(f"{'client':36}" + "".join(f"{op:>13}" for op in ops))
    median = {
        k: {op: statistics.median(v) * 1e6 for op, v in s.items()} for k, s in samples.items()
    }
    for kind, (label, _) in rows.items():
        cells = [f"{median[kind][op]:13.1f}" if op in median[kind] else f"{'-':>13}" for op in ops]
        print(f"{label:36}" + "".join(cells))
    base = median["redis-py"]
    print("\nratios to redis-py's plain command (corral RedisClient, unix socket)")
    for op in ops:
        if op in median["redis-unix"] and op in base:
            print(f"  {op:10} {median['redis-unix'][op] / base[op]:5.2f}x")
    if "get" in median["socket"]:
        print(
            f"  socket Client get = {median['socket']['get'] / median['redis-unix']['get']:.2f}x"
            " corral RedisClient get"
        )
    print("\nLua scripts inside Redis, microseconds per call (INFO commandstats)")
    for name, script, plain, cost in lua:
        extra = f"{plain:>18} {cost:6.1f}" if plain != "-" else ""
        print(f"  {name:34} {script:6.1f}   {extra}")
    print(
        "\nlock handoff between two processes (release -> acquire), milliseconds;"
        f" n = handoffs out of 2 x {args.handoffs} takes (an unfair lock hands over rarely)"
    )
    labels = {
        "redis-unix": "corral on Redis (BLPOP woken)",
        "socket": "corral socket broker",
        "redis-py": "redis-py Lock (polls every 0.1 s)",
        "redis-py-1ms": "redis-py Lock (polls every 1 ms)",
    }
    for kind, values in handoffs.items():
        if not values:
            print(f"  {labels[kind]:36} no handoff at all (the holder always took it back)")
        elif len(values) == 1:
            print(f"  {labels[kind]:36} one handoff: {values[0] * 1e3:.3f}   n=1")
        else:
            p90 = statistics.quantiles(values, n=10)[8] * 1e3
            print(
                f"  {labels[kind]:36} median {statistics.median(values) * 1e3:7.3f}"
                f"   p90 {p90:7.3f}   n={len(values)}"
            )


if __name__ == "__main__":
    main()
