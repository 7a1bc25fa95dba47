"""Broker round trips from a separate process, side by side with the floor and the usual ways.

Run: ``python -m benchmarks.broker_roundtrip [--ops 5000] [--rounds 3] [--items 50000]``.
Rows: a raw Unix-socket ping-pong (the floor: blocking echo, no parsing), the same with
both sides polling before they block (the floor for corral's busy-polling, see
``corral.broker._spin``), the same raw
client against an asyncio echo server (what the event loop alone costs), Redis via redis-py
over a Unix socket (a redis-server started on a temporary socket, when the binary exists),
one connection per NDJSON request to corral's broker (how the Node client talks), and
corral's sync ``Client`` (one persistent connection), with polling off and on. Each client
runs in its own process; rounds are interleaved so machine noise hits every row alike.
Then broker memory per item.
Targets: corral GET median <= 0.5 x redis-py's and <= 2.5 x the floor; >= 20k sequential
GETs/s; <= 1 KiB of broker memory per small item.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.broker import Client

OPS = ("ping", "get", "set")


# ---------------------------------------------------------------------- workers (child side)


def _time_ops(call: dict[str, Any], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    clock = time.perf_counter
    for op, fn in call.items():
        for _ in range(max(n // 10, 50)):  # warm up
            fn()
        samples = []
        for _ in range(n):
            started = clock()
            fn()
            samples.append(clock() - started)
        out[op] = samples
    return out


def worker_raw(path: str, n: int) -> dict[str, list[float]]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    line = b'{"action":"get","key":"k"}\n'

    def roundtrip() -> None:
        sock.sendall(line)
        sock.recv(65536)

    return _time_ops({"ping": roundtrip, "get": roundtrip, "set": roundtrip}, n)


def worker_raw_polling(path: str, n: int) -> dict[str, list[float]]:
    """The floor with the trick corral uses: poll up to the spin budget, then block."""
    from corral.broker._spin import budget_from_env, yield_cpu

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    line = b'{"action":"get","key":"k"}\n'
    budget = budget_from_env()
    clock = time.perf_counter

    def roundtrip() -> None:
        sock.sendall(line)
        end = clock() + budget
        while True:
            try:
                sock.recv(65536, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                if clock() >= end:
                    break
                yield_cpu()
        sock.recv(65536)

    return _time_ops({"ping": roundtrip, "get": roundtrip, "set": roundtrip}, n)


def worker_redis(path: str, n: int) -> dict[str, list[float]]:
    import redis

    r = redis.Redis(unix_socket_path=path)
    r.set("k", json.dumps("value"))
    return _time_ops(
        {"ping": r.ping, "get": lambda: r.get("k"), "set": lambda: r.set("k", '"value"', ex=60)},
        n,
    )


def worker_oneshot(path: str, n: int) -> dict[str, list[float]]:
    def request(line: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(line)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            json.loads(buf)

    ping = b'{"action":"ping"}\n'
    get = b'{"action":"get","key":"k"}\n'
    set_ = b'{"action":"set","key":"k","value":"value","ttl":60000}\n'
    return _time_ops(
        {"ping": lambda: request(ping), "get": lambda: request(get), "set": lambda: request(set_)},
        n,
    )


def worker_corral(path: str, n: int) -> dict[str, list[float]]:
    c = Client(path)
    c.set("k", "value", ttl=60)
    return _time_ops(
        {"ping": c.ping, "get": lambda: c.get("k"), "set": lambda: c.set("k", "value", ttl=60)},
        n,
    )


WORKERS = {
    "raw": worker_raw,
    "raw_polling": worker_raw_polling,
    "echo": worker_raw,
    "redis": worker_redis,
    "oneshot": worker_oneshot,
    "corral": worker_corral,
    "corral_blocking": worker_corral,
}


def worker_main(kind: str, path: str, n: int) -> None:
    samples = WORKERS[kind](path, n)
    json.dump(samples, sys.stdout)


# ---------------------------------------------------------------------- servers (parent side)


# The floor: echo one canned answer per read. With "poll" as its second argument it
# polls for up to corral's spin budget before each blocking read, as corral does.
RAW_ECHO = """
import socket, sys, time
from corral.broker._spin import budget_from_env, yield_cpu
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(8)
print("ready", flush=True)
answer = b'{"ok":true,"value":"value","compressed":false}\\n'
budget = budget_from_env() if sys.argv[2:] == ["poll"] else 0.0
clock = time.perf_counter
while True:
    conn, _ = server.accept()
    with conn:
        while True:
            end = clock() + budget
            data = None
            while data is None:
                try:
                    data = conn.recv(65536, socket.MSG_DONTWAIT) if budget else conn.recv(65536)
                except BlockingIOError:
                    if clock() >= end:
                        data = conn.recv(65536)
                    else:
                        yield_cpu()
            if not data:
                break
            conn.sendall(answer)
"""


ASYNCIO_ECHO = """
import asyncio, socket, sys


class Echo(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.view = memoryview(bytearray(65536))

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        self.transport.write(b'{"ok":true,"value":"value","compressed":false}\\n')


async def main():
    await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
"""


class Server:
    """A server in its own process, as in real use (``corral run`` hosts the broker in the
    CLI process; redis-server is its own process), so no row shares a process with another.
    """

    def __init__(self, args: list[str], path: str, env: dict[str, str] | None = None) -> None:
        self.path = path
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "ready" / the socket path

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:
        import redis
    except ImportError:
        return None
    path = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            path,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(unix_socket_path=path).ping()
            return proc, path
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    return None


def run_worker(kind: str, path: str, n: int) -> dict[str, list[float]]:
    env = dict(os.environ, CORRAL_SPIN_US="0") if kind == "corral_blocking" else None
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.broker_roundtrip", "--worker", kind, path, str(n)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
    )
    result: dict[str, list[float]] = json.loads(out.stdout)
    return result


def memory_per_item(items: int) -> tuple[float, float]:
    """Broker RSS growth per small item, with the broker alone in its own process."""
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as directory:
        path = os.path.join(directory, "mem.sock")
        code = (
            "import sys\n"
            "from corral import Broker\n"
            f"b = Broker(require_ttl=False, max_items=0, socket_path={path!r})\n"
            "b.start(); print('ready', flush=True); sys.stdin.read(); b.stop()\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        proc.stdout.readline()
        try:
            with Client(path) as c:
                c.set("warm", 0)
                before = c.stats()["memory"]
                for i in range(items):
                    c.set(f"user:{i:08d}", {"id": i, "ok": True})
                after = c.stats()["memory"]
        finally:
            proc.stdin.close()
            proc.wait()
    rss = (after["rss"] - before["rss"]) / items
    approx = (after["approximateStoreBytes"] - before["approximateStoreBytes"]) / items
    return rss, approx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=5000, help="timed requests per op per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per row")
    parser.add_argument("--items", type=int, default=50_000, help="items for the memory test")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker[0], args.worker[1], int(args.worker[2]))
        return

    directory = tempfile.mkdtemp(prefix="corral-bench-")
    corral_path = os.path.join(directory, "corral.sock")
    broker = Server(
        [sys.executable, "-m", "corral.cli", "broker", "--no-require-ttl", "--socket", corral_path],
        corral_path,
    )
    raw_path = os.path.join(directory, "raw.sock")
    raw = Server([sys.executable, "-c", RAW_ECHO, raw_path], raw_path)
    polling_path = os.path.join(directory, "polling.sock")
    polling = Server([sys.executable, "-c", RAW_ECHO, polling_path, "poll"], polling_path)
    blocking_path = os.path.join(directory, "blocking.sock")
    argv = [sys.executable, "-m", "corral.cli", "broker", "--no-require-ttl", "--socket"]
    blocking = Server(
        [*argv, blocking_path],
        blocking_path,
        env=dict(os.environ, CORRAL_SPIN_US="0"),
    )
    echo_path = os.path.join(directory, "echo.sock")
    echo = Server([sys.executable, "-c", ASYNCIO_ECHO, echo_path], echo_path)
    redis_server = start_redis(directory)
    rows: dict[str, tuple[str, str]] = {
        "raw": ("raw socket ping-pong (floor)", raw.path),
        "raw_polling": ("raw ping-pong, both sides polling", polling.path),
        "echo": ("raw client, asyncio echo server", echo.path),
        "redis": ("redis-py, unix socket", redis_server[1] if redis_server else ""),
        "oneshot": ("NDJSON, connection per request", broker.path),
        "corral_blocking": ("corral, polling off (SPIN_US=0)", blocking.path),
        "corral": ("corral Client (persistent)", broker.path),
    }
    if redis_server is None:
        print("redis-server or redis-py not available: skipping the Redis row", file=sys.stderr)
        del rows["redis"]
    samples: dict[str, dict[str, list[float]]] = {k: {op: [] for op in OPS} for k in rows}
    try:
        for _ in range(args.rounds):
            for kind, (_, path) in rows.items():
                for op, values in run_worker(kind, path, args.ops).items():
                    samples[kind][op].extend(values)
    finally:
        broker.close()
        for server in (raw, polling, blocking, echo):
            server.close()
        if redis_server is not None:
            redis_server[0].terminate()
            redis_server[0].wait()
        shutil.rmtree(directory, ignore_errors=True)

    median: dict[str, dict[str, float]] = {
        kind: {op: statistics.median(v) * 1e6 for op, v in ops.items()}
        for kind, ops in samples.items()
    }
    print(f"\nmedian round trip, microseconds ({args.rounds} x {args.ops} requests per cell)")
    print(f"{'client':34} {'ping':>9} {'get':>9} {'set':>9} {'get p99':>9} {'get ops/s':>10}")
    for kind, (label, _) in rows.items():
        m = median[kind]
        gets = samples[kind]["get"]
        p99 = statistics.quantiles(gets, n=100)[98] * 1e6
        ops_s = len(gets) / sum(gets)
        print(
            f"{label:34} {m['ping']:9.1f} {m['get']:9.1f} {m['set']:9.1f} {p99:9.1f} {ops_s:10,.0f}"
        )
    corral = median["corral"]
    print("\nratios (corral Client median / other median; lower is better)")
    for kind, (label, _) in rows.items():
        if kind == "corral":
            continue
        cells = "  ".join(f"{op} {corral[op] / median[kind][op]:5.2f}x" for op in OPS)
        print(f"  vs {label:32} {cells}")
    rss, approx = memory_per_item(args.items)
    print(
        f"\nbroker memory per small item ({args.items} items): {rss:.0f} B RSS growth, "
        f"{approx:.0f} B by the broker's own estimate"
    )
    get_s = len(samples["corral"]["get"]) / sum(samples["corral"]["get"])
    print("\ntargets")
    if "redis" in median:
        ratio = corral["get"] / median["redis"]["get"]
        print(f"  GET <= 0.5 x redis-py     {ratio:5.2f}x  {'met' if ratio <= 0.5 else 'MISSED'}")
    floor = corral["get"] / median["raw"]["get"]
    print(f"  GET <= 2.5 x raw floor    {floor:5.2f}x  {'met' if floor <= 2.5 else 'MISSED'}")
    like = corral["get"] / median["raw_polling"]["get"]
    verdict = "met" if like <= 2.5 else "MISSED"
    print(f"    (x polling floor        {like:5.2f}x  {verdict}: like for like)")
    still = median["corral_blocking"]["get"]
    if "redis" in median:
        still_ratio = still / median["redis"]["get"]
        print(f"    (polling off: {still:.1f} us, {still_ratio:.2f}x redis-py)")
    print(f"  >= 20k GETs/s             {get_s:7,.0f}  {'met' if get_s >= 20_000 else 'MISSED'}")
    print(f"  <= 1 KiB per item         {rss:7.0f}  {'met' if rss <= 1024 else 'MISSED'}")


if __name__ == "__main__":
    main()
