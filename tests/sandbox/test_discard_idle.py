"""``discard_idle()``: a handle lets go of its idle connections and keeps working.

What it is for: the database was dropped and cloned again under the same name (the
plugin does it after every ``no_sandbox`` test), so idle connections point at a database
that is gone. Each test makes a few connections idle, keeps one checked out, discards,
and asks the server which backends are left.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from corral._versions import installed, release
from corral.sandbox import sandbox
from tests.sandbox._adapters import Adapter

pytestmark = pytest.mark.asyncio

#: connections held at once to make them idle afterwards (the adapters' pools hold 4)
HELD = 3


async def discard(db: Any) -> None:
    result = db.discard_idle()
    if inspect.isawaitable(result):
        await result


def live(outside: Any, pids: set[int]) -> set[int]:
    """Which of *pids* still have a backend on the server."""
    rows = outside.execute(
        "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [sorted(pids)]
    ).fetchall()
    return {row[0] for row in rows}


def wait_gone(outside: Any, pids: set[int]) -> set[int]:
    """*pids* still alive once their backends had time to exit (a closed connection's
    backend leaves pg_stat_activity shortly after, not at once): empty when all went."""
    deadline = time.monotonic() + 15
    left = live(outside, pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = live(outside, pids)
    return left


class _Barrier:
    """All workers of :meth:`Adapter.concurrently` meet here (threads or tasks)."""

    def __init__(self, n: int, *, threaded: bool) -> None:
        self._threads = threading.Barrier(n) if threaded else None
        self._tasks = None if threaded else asyncio.Barrier(n)

    async def wait(self) -> None:
        if self._threads is not None:
            self._threads.wait(30)
        else:
            assert self._tasks is not None
            await asyncio.wait_for(self._tasks.wait(), 30)


async def make_idle(ad: Adapter, *, sandboxed: bool) -> set[int]:
    """Backend pids of :data:`HELD` connections the handle held at once, now idle."""
    barrier = _Barrier(HELD, threaded=not ad.is_async)

    async def worker(i: int) -> int:
        if sandboxed:
            await ad.create(nest=False)  # each its own sandbox, so its own connection
        try:
            async with ad.connection() as conn:
                pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
                await barrier.wait()  # all of them checked out at once
        finally:
            if sandboxed:
                await ad.close()
        return pid

    pids = set(await ad.concurrently(HELD, worker))
    assert len(pids) == HELD
    return pids


def _needs_pool_drain(ad: Adapter) -> None:
    # psycopg_pool < 3.3 has no drain(): discard_idle() replaces only the idle connections
    # that no longer work (documented in PsycopgPoolSandbox.discard_idle).
    pool = installed("psycopg-pool") or "0"
    if ad.name.startswith("psycopg-") and release(pool) < release("3.3"):
        pytest.skip(f"psycopg_pool {pool} has no drain(): idle connections are kept")


@asynccontextmanager
async def held(ad: Adapter) -> AsyncIterator[tuple[Any, int]]:
    async with ad.connection() as conn:
        yield conn, int(await conn.fetchval("SELECT pg_backend_pid()"))


async def test_normal_mode_closes_idle_keeps_checked_out(ad: Adapter, outside: Any) -> None:
    _needs_pool_drain(ad)
    ad.db.mode = "normal"
    idle = await make_idle(ad, sandboxed=False)
    async with held(ad) as (conn, mine):
        await discard(ad.db)
        assert wait_gone(outside, idle - {mine}) == set()
        assert live(outside, {mine}) == {mine}
        assert await conn.fetchval("SELECT 41 + 1") == 42  # the checkout still works
    # The handle works afterwards, in both modes.
    assert await ad.fetchval("SELECT count(*) FROM item") == 0
    ad.db.mode = "sandbox"
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('after')")
    assert await ad.fetchval("SELECT count(*) FROM item") == 1
    await ad.close()


async def test_sandbox_mode_closes_idle_keeps_the_open_sandbox(ad: Adapter, outside: Any) -> None:
    _needs_pool_drain(ad)
    idle = await make_idle(ad, sandboxed=True)
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('kept')")
    async with held(ad) as (_, mine):
        pass  # the sandbox's connection: checked out for as long as the sandbox is open
    await discard(ad.db)
    assert wait_gone(outside, idle - {mine}) == set()
    assert live(outside, {mine}) == {mine}
    assert await ad.fetchval("SELECT count(*) FROM item") == 1  # the sandbox goes on
    await ad.close()
    assert outside.execute("SELECT count(*) FROM item").fetchone() == (0,)
    # Later sandboxes get working connections; so does normal mode.
    await make_idle(ad, sandboxed=True)
    await ad.create()
    assert await ad.fetchval("SELECT count(*) FROM item") == 0
    await ad.close()
    ad.db.mode = "normal"
    assert await ad.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("sandboxed", [False, True], ids=["normal", "sandbox"])
async def test_after_the_backends_died_the_next_checkout_works(
    ad: Adapter, outside: Any, sandboxed: bool
) -> None:
    # What a recreated database does to idle connections: their backends are gone.
    if not sandboxed:
        ad.db.mode = "normal"
    idle = await make_idle(ad, sandboxed=sandboxed)
    outside.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [list(idle)])
    assert wait_gone(outside, idle) == set()
    await discard(ad.db)
    # Every connection the handle hands out now works, at the first try: none is dead.
    for _ in range(HELD + 1):
        if sandboxed:
            await ad.create()
        try:
            assert await ad.fetchval("SELECT count(*) FROM item") == 0
        finally:
            if sandboxed:
                await ad.close()


async def test_discard_on_a_handle_with_nothing_idle(ad: Adapter) -> None:
    await discard(ad.db)
    await discard(ad.db)
    await ad.create()
    assert await ad.fetchval("SELECT 1") == 1
    await ad.close()


# ----------------------------------------------------------------- connection factories


async def test_connect_factory_closes_kept_connections(sandbox_dsn: str, outside: Any) -> None:
    db = sandbox(sandbox_dsn, mode="sandbox")
    db.create_sandbox()
    with db.connect() as conn:
        mine = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    pids = set()
    for _ in range(HELD):  # independent sandboxes inside it: a connection each
        db.create_sandbox(nest=False)
        with db.connect() as conn:
            pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    for _ in range(HELD):
        db.close_sandbox()  # their connections are kept for the next sandboxes: idle
    assert len(pids) == HELD
    assert mine not in pids
    db.discard_idle()
    assert wait_gone(outside, pids) == set()
    assert live(outside, {mine}) == {mine}
    with db.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    db.close_sandbox()
    db.mode = "normal"
    with db.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    db.mode = "sandbox"
    with db.sandboxed(), db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (0,)
    db.discard_idle()


async def test_async_connect_factory_closes_kept_connections(
    sandbox_dsn: str, outside: Any
) -> None:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(sandbox_dsn)

    db = sandbox(connect, mode="sandbox")

    async def pid() -> int:
        async with await db.connect() as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    await db.create_sandbox()
    mine = await pid()
    pids = set()
    for _ in range(HELD):
        await db.create_sandbox(nest=False)
        pids.add(await pid())
    for _ in range(HELD):
        await db.close_sandbox()
    assert len(pids) == HELD
    assert mine not in pids
    await db.discard_idle()
    assert wait_gone(outside, pids) == set()
    assert live(outside, {mine}) == {mine}
    assert await pid() == mine
    await db.close_sandbox()
    async with db.sandboxed(), await db.connect() as conn:
        cur = await conn.execute("SELECT count(*) FROM item")
        assert await cur.fetchone() == (0,)
    await db.discard_idle()
