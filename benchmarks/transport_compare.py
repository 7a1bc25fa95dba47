"""What TCP on 127.0.0.1 costs per test against the Unix socket, and what users get from the
URL the pytest plugin hands out, side by side in one process.

Run: ``python -m benchmarks.sandbox_overhead --transport both [--rounds 300]``.
One throwaway server listening on both (as the pytest plugin starts it), one database,
the same handles opened once over each of three DSNs: ``socket`` (the socket directory
only), ``tcp`` (``postgresql://postgres:PW@127.0.0.1:PORT/db``) and ``url`` (what the
plugin hands out: the TCP URL with ``?host=<socket directory>``; each driver goes where
it reads it to go: psycopg to the socket, asyncpg to 127.0.0.1, an asyncpg pool's
sandbox to the socket as in the plugin's test processes). Blocks of consecutive
tests alternate between them, so drift in machine load hits all alike; the ratios are
over the socket, block by block (median). Target (issue 14): no more than 5 % per test.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import psycopg
import psycopg_pool

from benchmarks.sandbox_overhead import Bench, pin, timed, workload
from corral._plugin._dbenv import url_parts
from corral.postgres import database_dsn
from corral.sandbox import sandbox
from corral.sandbox._targets import add_socket_route, remove_socket_route

TRANSPORTS = ("socket", "tcp", "url")
#: Where each driver's connections over each DSN landed: ``{"url": {"psycopg": "socket"}}``.
LANDED: dict[str, dict[str, str]] = {}
_WHERE = "SELECT coalesce(host(inet_server_addr()), 'socket')"


class Handles:
    """What an app holds, opened over one transport: a connection and a sandboxed pool."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn = psycopg.Connection.connect(dsn, autocommit=True)
        self.pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=2)
        self.pool.wait()
        self.sb: Any = sandbox(self.pool, mode="sandbox")
        row = self.conn.execute(_WHERE).fetchone()
        self.where = str(row[0]) if row else "?"

    def close(self) -> None:
        self.conn.close()
        self.pool.close()

    def bare_body(self) -> None:
        self.conn.execute(b"BEGIN")
        with self.conn.transaction():
            pass
        workload(self.conn)
        self.conn.execute(b"ROLLBACK")

    def sandbox_empty(self) -> None:
        self.sb.create_sandbox()
        self.sb.close_sandbox()

    def sandbox_body(self) -> None:
        self.sb.create_sandbox()
        with self.sb.connection() as conn:
            workload(conn)
        self.sb.close_sandbox()

    def round_trip(self) -> None:
        self.conn.execute(b"SELECT 1")

    def connect(self) -> None:
        with psycopg.Connection.connect(self.dsn, autocommit=True) as conn:
            conn.execute(b"SELECT 1")


STRATEGIES: dict[str, Callable[[Handles], None]] = {
    "one round trip (autocommit SELECT 1)": Handles.round_trip,
    "bare BEGIN/ROLLBACK + body": Handles.bare_body,
    "sandbox create+close (empty test)": Handles.sandbox_empty,
    "sandbox + body (3 app transactions)": Handles.sandbox_body,
    "new connection + SELECT 1 (psycopg)": Handles.connect,
}


async def _sandboxed(db: Any, query: str) -> Any:
    await db.create_sandbox()
    try:
        return await db.fetchval(query)
    finally:
        await db.close_sandbox()


def _asyncpg_rows(
    dsns: dict[str, str], rounds: int, block: int, admin_dsn: str, database: str
) -> dict[str, list[float]]:
    """An asyncpg pool in a sandbox, and asyncpg's own connect, over each transport
    (asyncpg's own connect keeps the URL's host: TCP whatever corral knows)."""
    split = urlsplit(dsns["url"])
    port, socket_dir = split.port, parse_qs(split.query)["host"][0]
    assert port is not None

    async def main() -> dict[str, list[float]]:
        # asyncpg takes URLs only: the key=value strings as URLs.
        urls = {t: url_parts(d)["url"] for t, d in dsns.items()}
        pools = {t: await asyncpg.create_pool(u, min_size=1, max_size=2) for t, u in urls.items()}
        sbs: dict[str, Any] = {t: sandbox(p, mode="sandbox") for t, p in pools.items()}
        for t, pool in pools.items():
            LANDED.setdefault(t, {})["asyncpg"] = str(await pool.fetchval(_WHERE))
        # As in a test process of the plugin, which records its server's socket: a sandbox
        # of a pool that reaches it by TCP connects through the socket. The tcp pool's
        # sandbox opens first, before the route exists, and so stays on TCP to compare.
        for t in ("socket", "tcp", "url"):
            if t == "url":
                add_socket_route(port, socket_dir)
            LANDED[t]["asyncpg sandbox"] = str(await _sandboxed(sbs[t], _WHERE))

        async def body(transport: str) -> None:
            sb = sbs[transport]
            await sb.create_sandbox()
            async with sb.acquire() as conn:
                async with conn.transaction():
                    uid = await conn.fetchval(
                        "INSERT INTO users (email) VALUES ($1) RETURNING id", f"a{id(conn)}{_n()}"
                    )
                async with conn.transaction():
                    oid = await conn.fetchval(
                        "INSERT INTO orders (user_id, total) VALUES ($1, 9.5) RETURNING id", uid
                    )
                    await conn.execute(
                        "INSERT INTO items (order_id, sku, qty) VALUES ($1, 'a', 1)", oid
                    )
                await conn.fetchval("SELECT count(*) FROM orders WHERE user_id = $1", uid)
            await sb.close_sandbox()

        async def connect(transport: str) -> None:
            conn = await asyncpg.connect(urls[transport])
            await conn.fetchval("SELECT 1")
            await conn.close()

        names = {
            "asyncpg pool sandbox + body": body,
            "new connection + SELECT 1 (asyncpg)": connect,
        }
        out: dict[str, list[float]] = {f"{n} [{t}]": [] for n in names for t in dsns}
        admin = psycopg.Connection.connect(admin_dsn, autocommit=True)
        try:
            for cycle in range(max(1, rounds // block)):
                for name, fn in names.items():
                    shift = cycle % len(TRANSPORTS)  # who goes first rotates, as above
                    for transport in TRANSPORTS[shift:] + TRANSPORTS[:shift]:
                        await fn(transport)  # warm
                        if cycle == 0:
                            pin()
                        pids = [] if fn is connect else _backends(admin, database)
                        cpu = _cpu_ns(pids)
                        for _ in range(block):
                            started = _clock()
                            await fn(transport)
                            out[f"{name} [{transport}]"].append(_clock() - started)
                        if pids:
                            per_test = (_cpu_ns(pids) - cpu) / block / 1e9
                            out.setdefault(f"{name} [{transport}] cpu", []).append(per_test)
        finally:
            admin.close()
            remove_socket_route(port)
            for sb in sbs.values():
                await sb.close()  # the sandbox keeps a connection: pool.close() would wait
        return out

    return asyncio.run(main())


_counter = iter(range(1 << 62))


def _n() -> int:
    return next(_counter)


def _clock() -> float:
    return time.perf_counter()


def _cpu_ns(pids: list[int]) -> int:
    """CPU time used so far by this process (all threads) and the backends *pids*.

    ``/proc/PID/schedstat``'s first field: nanoseconds on a CPU. Unlike wall time, it does
    not grow with the machine's load (waiting for a CPU is not counted), so it shows what
    each transport costs even on a busy machine; the kernel's loopback work is charged to
    the processes that send and receive.
    """
    total = time.process_time_ns()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _backends(admin: psycopg.Connection[Any], database: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
        [database],
    ).fetchall()
    return [int(r[0]) for r in rows]


def compare(bench: Bench, handed_out: str, rounds: int) -> dict[str, list[float]]:
    """Every strategy over each transport (*handed_out*: the server's URL as the plugin
    hands it out), in alternating blocks; rows ``name [transport]``
    (wall seconds per test) and ``name [transport] cpu`` (CPU seconds per test, by block,
    for the strategies that keep their connections)."""
    url = database_dsn(handed_out, bench.db)
    dsns = {"socket": bench.dsn(bench.db), "tcp": url.split("?", 1)[0], "url": url}
    handles = {t: Handles(dsn) for t, dsn in dsns.items()}
    for t, h in handles.items():
        LANDED.setdefault(t, {})["psycopg"] = h.where
    admin = psycopg.Connection.connect(bench.admin, autocommit=True)
    block = max(1, min(20, rounds // 10))
    out: dict[str, list[float]] = {f"{n} [{t}]": [] for n in STRATEGIES for t in TRANSPORTS}
    try:
        for cycle in range(max(1, rounds // block)):
            for name, fn in STRATEGIES.items():
                # Which transport goes first rotates too: no systematic warm-cache edge.
                shift = cycle % len(TRANSPORTS)
                order = TRANSPORTS[shift:] + TRANSPORTS[:shift]
                for transport in order:
                    h = handles[transport]
                    fn(h)  # warm
                    if cycle == 0:
                        pin()
                    run = functools.partial(fn, h)
                    pids = [] if fn is Handles.connect else _backends(admin, bench.db)
                    cpu = _cpu_ns(pids)
                    out[f"{name} [{transport}]"].extend(timed(run) for _ in range(block))
                    if pids:
                        per_test = (_cpu_ns(pids) - cpu) / block / 1e9
                        out.setdefault(f"{name} [{transport}] cpu", []).append(per_test)
    finally:
        admin.close()
        for h in handles.values():
            h.close()
    out.update(_asyncpg_rows(dsns, rounds, block, bench.admin, bench.db))
    return out


def paired(a: list[float], b: list[float]) -> float:
    """Median over aligned blocks of (block median of *a* / block median of *b*)."""
    size = max(1, min(20, len(a) // 10))
    ratios = [
        statistics.median(a[i : i + size]) / statistics.median(b[i : i + size])
        for i in range(0, min(len(a), len(b)) - size + 1, size)
    ]
    return statistics.median(ratios)


def report(rows: dict[str, list[float]]) -> None:
    names = list(dict.fromkeys(k.rsplit(" [", 1)[0] for k in rows if not k.endswith(" cpu")))
    width = max(len(n) for n in names)
    others = TRANSPORTS[1:]
    print("\nUnix socket vs TCP 127.0.0.1 (SCRAM login) vs the URL the plugin hands out")
    print("(TCP URL + ?host=<socket dir>), same server and database, medians")
    for t, drivers in LANDED.items():
        print(f"  {t}: " + ", ".join(f"{d} connects to {w}" for d, w in drivers.items()))
    head = "".join(f"{t:>10}" for t in TRANSPORTS) + "".join(f"{t + '/sock':>11}" for t in others)
    print(f"  {'wall time per test':<{width}} {head} {'n':>5}")
    for name in names:
        med = "".join(
            f"{statistics.median(rows[f'{name} [{t}]']) * 1e6:>7.0f} us" for t in TRANSPORTS
        )
        sock = rows[f"{name} [socket]"]
        ratios = "".join(f"{paired(rows[f'{name} [{t}]'], sock):>10.3f}x" for t in others)
        print(f"  {name:<{width}} {med} {ratios} {len(sock):>5}")
    print("\n  CPU time per test (this process + the database's backends; load-independent)")
    print(f"  {'':<{width}} {head} {'blocks':>6}")
    for name in names:
        if f"{name} [tcp] cpu" not in rows:
            continue
        cpu = {t: rows[f"{name} [{t}] cpu"] for t in TRANSPORTS}
        med = "".join(f"{statistics.median(cpu[t]) * 1e6:>7.0f} us" for t in TRANSPORTS)
        pairs = {t: zip(cpu[t], cpu["socket"], strict=False) for t in others}
        ratios = "".join(
            f"{statistics.median(a / s for a, s in pairs[t] if s):>10.3f}x" for t in others
        )
        print(f"  {name:<{width}} {med} {ratios} {len(cpu['socket']):>6}")
