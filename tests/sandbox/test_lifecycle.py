"""Sandbox lifecycle (nesting, restore, modes, registry) and the documented limits."""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from corral.errors import SandboxBusy, SandboxError
from corral.sandbox import registered, sandbox
from tests.sandbox._adapters import Adapter


@pytest.mark.asyncio
async def call(fn: Any, *args: Any) -> Any:
    """Call a sync or async API the same way."""
    result = fn(*args)
    return await result if inspect.isawaitable(result) else result


async def names(ad: Adapter) -> list[str]:
    async with ad.connection() as conn:
        return [r[0] for r in await conn.fetch("SELECT name FROM item ORDER BY name")]


@pytest.mark.asyncio
async def test_nested_sandboxes_give_module_data_and_per_test_rollback(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()  # "module": shared setup data
    await ad.execute("INSERT INTO item (name) VALUES ('setup')")
    for test in ("t1", "t2"):
        await ad.create()  # "test": a savepoint inside
        await ad.execute("INSERT INTO item (name) VALUES (%s)", (test,))
        assert await names(ad) == ["setup", test]
        await ad.close()
        assert await names(ad) == ["setup"]
    await ad.close()
    assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0


@pytest.mark.asyncio
async def test_restore_rolls_back_to_the_start_and_keeps_the_sandbox(ad: Adapter) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('a')")
    await ad.restore()
    assert await names(ad) == []
    await ad.execute("INSERT INTO item (name) VALUES ('b')")
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('c')")
    await ad.restore()  # the inner level: back to its start, 'b' stays
    assert await names(ad) == ["b"]
    await ad.close()
    await ad.close()


@pytest.mark.asyncio
async def test_restore_refreshes_now(ad: Adapter) -> None:
    await ad.create()
    first = await ad.fetchval("SELECT now()")
    await asyncio.sleep(0.01)
    assert await ad.fetchval("SELECT now()") == first  # frozen within one sandbox (a limit)
    await ad.restore()
    assert await ad.fetchval("SELECT now()") > first
    await ad.close()


@pytest.mark.asyncio
async def test_independent_sandbox_shadows_the_inherited_one(ad: Adapter) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('parent')")
    await ad.create(nest=False)
    assert await names(ad) == []
    await ad.execute("INSERT INTO item (name) VALUES ('child')")
    await ad.close()
    assert await names(ad) == ["parent"]
    await ad.close()


@pytest.mark.asyncio
async def test_limits_sequences_advance_and_notify_is_never_delivered(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    heard: list[Any] = []
    outside.add_notify_handler(heard.append)  # psycopg 3.1 has no notifies(timeout=)
    outside.execute("LISTEN corral_test")
    first = await ad.fetchval("INSERT INTO item (name) VALUES ('a') RETURNING id")
    await ad.execute("NOTIFY corral_test, 'hello'")
    await ad.close()
    await ad.create()
    second = await ad.fetchval("INSERT INTO item (name) VALUES ('a') RETURNING id")
    await ad.close()
    # Sequences are not transactional: ids keep growing across sandboxes. Tests must
    # not assert on literal ids.
    assert second > first
    # A delivered notification would reach the handler with the next statement's answer.
    await asyncio.sleep(0.1)
    outside.execute("SELECT 1")
    assert heard == []


@pytest.mark.asyncio
async def test_lock_timeout_is_set_in_each_sandbox(ad: Adapter) -> None:
    await ad.create()
    assert await ad.fetchval("SHOW lock_timeout") == "5s"
    await ad.close()


@pytest.mark.asyncio
async def test_close_without_a_sandbox_is_an_error(ad: Adapter) -> None:
    with pytest.raises(SandboxError, match="create_sandbox"):
        await ad.close()


@pytest.mark.asyncio
async def test_connection_kept_past_close_fails_clearly(ad: Adapter) -> None:
    await ad.create()
    raw = await ad.getconn()
    await ad.close()
    with pytest.raises(Exception) as info:  # SQLAlchemy wraps it in a StatementError
        await ad.raw_execute(raw, "SELECT 1")
    assert isinstance(ad.original(info.value), SandboxError), info.value
    assert "closed" in str(info.value)
    await ad.putconn(raw)


@pytest.mark.asyncio
async def test_holding_a_connection_while_waiting_for_work_that_needs_one_is_reported(
    sandbox_dsn: str,
) -> None:
    from tests.sandbox._adapters import PsycopgAsync

    ad = PsycopgAsync(sandbox_dsn, checkout_timeout=0.2)
    await ad.open()
    await ad.create()
    try:
        async with ad.connection() as held:
            # Nothing written: the holder lends the connection to the work it awaits.
            assert list(await asyncio.gather(ad.fetchval("SELECT 1"))) == [1]
            async with held.transaction():
                await held.execute("INSERT INTO item (name) VALUES ('held')")
                # Written and uncommitted: one connection cannot interleave that.
                with pytest.raises(SandboxBusy, match=r"deadlock.*gather"):
                    await asyncio.gather(ad.fetchval("SELECT 1"))
    finally:
        await ad.close()
        await ad.aclose()


# --------------------------------------------------------------------------- modes


def test_normal_mode_is_a_pass_through(sandbox_dsn: str, outside: Any) -> None:
    import psycopg_pool

    with psycopg_pool.ConnectionPool(sandbox_dsn, min_size=1, max_size=2) as pool:
        db: Any = sandbox(pool, mode="normal")
        assert db.mode == "normal"
        assert db not in registered()
        db.create_sandbox()  # no-op: the same test code runs in both modes
        with db.connection() as conn:
            assert type(conn) is psycopg.Connection
            conn.execute("INSERT INTO item (name) VALUES ('really')")
        db.close_sandbox()
        assert db.get_stats()["pool_max"] == 2  # the pool's own API passes through
    try:
        assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 1
    finally:
        outside.execute("DELETE FROM item")


def test_mode_comes_from_the_environment(sandbox_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SANDBOX_MODE", raising=False)
    assert sandbox(sandbox_dsn).mode == "normal"  # production is the default
    monkeypatch.setenv("CORRAL_SANDBOX_MODE", "sandbox")
    db = sandbox(sandbox_dsn)
    assert db.mode == "sandbox"
    assert db in registered()
    assert sandbox(sandbox_dsn, mode="normal").mode == "normal"
    monkeypatch.setenv("CORRAL_SANDBOX_MODE", "bogus")
    with pytest.raises(ValueError, match="CORRAL_SANDBOX_MODE"):
        sandbox(sandbox_dsn)


def test_registry_holds_live_sandbox_mode_handles_weakly(sandbox_dsn: str) -> None:
    db = sandbox(sandbox_dsn, mode="sandbox")
    async_db = sandbox(sandbox_dsn, mode="sandbox", is_async=True)
    live = registered()
    assert db in live
    assert async_db in live
    assert not db.is_async
    assert async_db.is_async
    assert live.index(db) < live.index(async_db)  # oldest first
    ident = id(db)
    del db, live
    gc.collect()
    assert ident not in {id(c) for c in registered()}


def test_unknown_handles_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot sandbox"):
        sandbox(42)


# --------------------------------------------------------------------------- factories


def test_connection_factory_sync(sandbox_dsn: str, outside: Any) -> None:
    import functools

    from psycopg.rows import dict_row

    db: Any = sandbox(functools.partial(psycopg.Connection.connect, sandbox_dsn), mode="sandbox")
    try:
        with db.sandboxed():
            with db.connect() as conn:
                conn.execute("INSERT INTO item (name) VALUES ('f')")
            conn = db.connect(autocommit=True, row_factory=dict_row)
            assert conn.autocommit
            assert conn.execute("SELECT name FROM item").fetchall() == [{"name": "f"}]
            conn.close()
            assert conn.closed
        assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0
        with db.sandboxed(), db.connect() as conn:  # the idle connection is reused
            assert conn.execute("SELECT count(*) FROM item").fetchone()[0] == 0
    finally:
        db.close()


@pytest.mark.asyncio
async def test_connection_factory_async(sandbox_dsn: str, outside: Any) -> None:
    db: Any = sandbox(sandbox_dsn, mode="sandbox", is_async=True)
    try:
        async with db.sandboxed():
            async with await db.connect() as conn:
                await conn.execute("INSERT INTO item (name) VALUES ('f')")
                assert conn.info.transaction_status.name == "INTRANS"
            async with await db.connect(autocommit=True) as conn:
                cur = await conn.execute("SELECT count(*) FROM item")
                assert await cur.fetchone() == (1,)
        assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0
    finally:
        await db.close()


def test_mode_cannot_change_under_an_open_sandbox(sandbox_dsn: str) -> None:
    db: Any = sandbox(sandbox_dsn, mode="sandbox")
    try:
        with db.sandboxed():
            with pytest.raises(SandboxError, match="mode"):
                db.mode = "normal"
            assert db.active
        assert not db.active
        db.mode = "normal"
        assert db not in registered()
    finally:
        db.close()


def test_close_with_a_checkout_held_by_a_stuck_thread_still_closes(sandbox_dsn: str) -> None:
    import threading

    db: Any = sandbox(sandbox_dsn, mode="sandbox", checkout_timeout=0.2)
    try:
        db.create_sandbox()
        got, release = threading.Event(), threading.Event()

        def stuck() -> None:
            conn = db.connect()
            got.set()
            release.wait(10)
            with pytest.raises((psycopg.Error, SandboxError)):
                conn.execute("SELECT 1")

        t = threading.Thread(target=db.allow(stuck))
        t.start()
        assert got.wait(10)
        with pytest.raises(SandboxBusy, match="thread"):
            db.close_sandbox()  # reported, but the sandbox is gone all the same
        assert not db.active
        release.set()
        t.join(10)
        with db.sandboxed(), db.connect() as conn:  # and the handle still works
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        db.close()


@pytest_asyncio.fixture
async def opened_in_fixture(ad: Adapter) -> AsyncIterator[Adapter]:
    """What the pytest plugin does: open in a fixture, close in its teardown."""
    await ad.create()
    yield ad
    await ad.close()
    assert not ad.db.active


@pytest.mark.asyncio
async def test_a_sandbox_opened_in_a_fixture_serves_the_test(
    opened_in_fixture: Adapter, outside: Any
) -> None:
    ad = opened_in_fixture
    assert ad.db.active
    await ad.execute("INSERT INTO item (name) VALUES ('from-test')")
    assert await names(ad) == ["from-test"]
    assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0


@pytest.fixture
def sync_sandbox(sandbox_dsn: str) -> Iterator[Any]:
    db: Any = sandbox(sandbox_dsn, mode="sandbox")
    db.create_sandbox()
    yield db
    db.close_sandbox()
    db.close()


@pytest.mark.asyncio
async def test_a_sync_fixtures_sandbox_reaches_an_async_test(sync_sandbox: Any) -> None:
    with sync_sandbox.connect() as conn:
        conn.execute("INSERT INTO item (name) VALUES ('x')")
    assert sync_sandbox.active
