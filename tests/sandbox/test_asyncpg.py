"""asyncpg specifics beyond the shared spec: the Pool API, transaction() arguments,
no reset between the app's acquires, prepared statements across DDL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from corral._versions import installed, release
from corral.errors import SandboxError
from corral.sandbox import AsyncpgPoolSandbox, AsyncpgSandboxConnection, sandbox
from tests.sandbox._adapters import asyncpg_params

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def pool(sandbox_dsn: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(min_size=1, max_size=3, **asyncpg_params(sandbox_dsn))
    yield p
    await p.close()


@pytest_asyncio.fixture
async def db(pool: Any) -> AsyncIterator[AsyncpgPoolSandbox]:
    controller = sandbox(pool, mode="sandbox")
    assert isinstance(controller, AsyncpgPoolSandbox)
    await controller.create_sandbox()
    yield controller
    while controller._router.owned() is not None:
        await controller.close_sandbox()
    await controller._release_idle()


def count_outside(outside: Any) -> int:
    n: int = outside.execute("SELECT count(*) FROM item").fetchone()[0]
    return n


async def test_pool_api(db: AsyncpgPoolSandbox, outside: Any) -> None:
    assert await db.execute("INSERT INTO item (name) VALUES ($1), ($2)", "a", "b") == "INSERT 0 2"
    await db.executemany("INSERT INTO item (name) VALUES ($1)", [("c",), ("d",)])
    assert await db.fetchval("SELECT count(*) FROM item") == 4
    row = await db.fetchrow("SELECT name FROM item WHERE name = $1", "a")
    assert row is not None
    assert row["name"] == "a"
    assert [r["name"] for r in await db.fetch("SELECT name FROM item ORDER BY name")] == list(
        "abcd"
    )
    await db.copy_records_to_table("item", records=[("e",)], columns=["name"])
    conn = await db.acquire()
    try:
        assert isinstance(conn, AsyncpgSandboxConnection)
        assert await conn.fetchval("SELECT count(*) FROM item") == 5
    finally:
        await db.release(conn)
    assert count_outside(outside) == 0


async def test_nested_transactions_and_failed_statements(db: AsyncpgPoolSandbox) -> None:
    async with db.acquire() as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO item (name) VALUES ('outer')")
            with pytest.raises(asyncpg.UniqueViolationError):  # noqa: PT012
                async with conn.transaction():
                    await conn.execute("INSERT INTO item (name) VALUES ('inner')")
                    await conn.execute("INSERT INTO item (name) VALUES ('outer')")
            assert conn.is_in_transaction()
        assert not conn.is_in_transaction()
        # Outside a transaction each statement commits on its own; a failing one is
        # undone alone and the connection stays usable (no InFailedSQLTransaction).
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO item (name) VALUES ('outer')")
        assert await conn.fetchval("SELECT array_agg(name) FROM item") == ["outer"]


async def test_transaction_arguments(db: AsyncpgPoolSandbox) -> None:
    async with db.acquire() as conn:
        async with conn.transaction(readonly=True):
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await conn.execute("INSERT INTO item (name) VALUES ('ro')")
        async with conn.transaction():  # read-write again after the read-only one
            await conn.execute("INSERT INTO item (name) VALUES ('rw')")
        async with conn.transaction(isolation="read_committed"):  # the sandbox's level
            pass
        with pytest.raises(SandboxError, match="isolation_level='SERIALIZABLE'") as info:
            async with conn.transaction(isolation="serializable"):
                pass
        assert isinstance(info.value, asyncpg.InterfaceError)
        async with conn.transaction():
            with pytest.raises(asyncpg.InterfaceError, match="different isolation"):
                async with conn.transaction(isolation="serializable"):
                    pass
        await conn.execute("BEGIN")
        with pytest.raises(asyncpg.InterfaceError, match="manually started"):
            await conn.transaction().start()
        await conn.execute("ROLLBACK")
        assert await conn.fetchval("SELECT count(*) FROM item") == 1


async def test_serializable_sandbox_honours_serializable_transactions(
    pool: Any, outside: Any
) -> None:
    ctl: Any = sandbox(pool, mode="sandbox", isolation_level="SERIALIZABLE")
    async with (
        ctl.sandboxed(),
        ctl.acquire() as conn,
        conn.transaction(isolation="serializable"),
    ):
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
    await ctl._release_idle()


async def test_no_reset_between_the_apps_acquires(db: AsyncpgPoolSandbox) -> None:
    async with db.acquire() as conn:
        await conn.execute("SET statement_timeout = '7s'")  # a session setting of the app
    async with db.acquire() as conn:
        # asyncpg's release would have run RESET ALL / UNLISTEN *: it did not, so the
        # sandbox's SET LOCAL lock_timeout and the app's own settings survive.
        assert await conn.fetchval("SHOW statement_timeout") == "7s"
        assert await conn.fetchval("SHOW lock_timeout") == "5s"


async def test_prepared_statements_survive_ddl(db: AsyncpgPoolSandbox) -> None:
    async with db.acquire() as conn:
        stmt = await conn.prepare("SELECT * FROM item")
        assert len(stmt.get_attributes()) == 3
        await conn.fetch("SELECT * FROM item")  # in asyncpg's statement cache
        await conn.execute("ALTER TABLE item ADD COLUMN extra int")
        assert len(await conn.fetch("SELECT * FROM item WHERE true")) == 0
        await conn.execute("INSERT INTO item (name, extra) VALUES ('x', 1)")
        rows = await conn.fetch("SELECT * FROM item")
        assert list(rows[0].keys()) == ["id", "name", "note", "extra"]
        assert len(await stmt.fetch()) == 1  # re-prepared, not "cached plan must not change"
    await db.close_sandbox()  # rolls the DDL back: the cached statements are stale again
    async with db.sandboxed(), db.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM item")
        assert rows == []
        await conn.execute("INSERT INTO item (name) VALUES ('y')")
        assert list((await conn.fetchrow("SELECT * FROM item")).keys()) == ["id", "name", "note"]


@pytest.mark.skipif(
    release(installed("asyncpg") or "0") < release("0.32"),
    reason="before asyncpg 0.32 a cursor needs a transaction begun by asyncpg's own "
    "transaction() (a private flag), which a sandbox's savepoint is not",
)
async def test_cursor_needs_a_transaction_as_in_asyncpg(db: AsyncpgPoolSandbox) -> None:
    async with db.acquire() as conn:
        await conn.executemany(
            "INSERT INTO item (name) VALUES ($1)", [(f"n{i}",) for i in range(5)]
        )
        with pytest.raises(asyncpg.NoActiveSQLTransactionError):
            conn.cursor("SELECT name FROM item")
        async with conn.transaction():
            names = [r["name"] async for r in conn.cursor("SELECT name FROM item ORDER BY name")]
        assert names == [f"n{i}" for i in range(5)]


async def test_normal_mode_is_the_pool(pool: Any, outside: Any) -> None:
    ctl: Any = sandbox(pool, mode="normal")
    async with ctl.acquire() as conn:
        assert type(conn).__name__ == "PoolConnectionProxy"
        await conn.execute("INSERT INTO item (name) VALUES ('real')")
    assert count_outside(outside) == 1
    outside.execute("DELETE FROM item")


async def test_session_advisory_locks_do_not_outlive_the_sandbox(db: AsyncpgPoolSandbox) -> None:
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    await db.fetchval("SELECT pg_advisory_lock(4242)")  # session-level: survives ROLLBACK
    assert await db.fetchval(held) == 1
    await db.close_sandbox()
    async with db.sandboxed():  # the same connection, kept between sandboxes
        assert await db.fetchval(held) == 0


async def test_kept_connections_go_back_to_the_pool(pool: Any) -> None:
    # corral sends its statements to the driver connection behind the pool's proxy;
    # what goes back to the pool must still be the pool's own checkout.
    db = AsyncpgPoolSandbox(pool, mode="sandbox", max_idle=1)
    await db.create_sandbox()
    await db.create_sandbox(nest=False)  # a second connection: more than max_idle
    assert await db.fetchval("SELECT 1") == 1
    await db.close_sandbox()
    await db.close_sandbox()
    assert pool.get_size() - pool.get_idle_size() == 1  # one kept for the next sandbox
    await db.expire_connections()
    assert pool.get_idle_size() == pool.get_size()
