"""Defects a torture run found in the sandbox (issue 16, items 7-8), run on every adapter.

Each was a way for one test to leave state behind for the next, or for the app to see
the sandbox's own machinery where production shows nothing.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.sandbox._adapters import Adapter

pytestmark = pytest.mark.asyncio


def advisory_locks_held(outside: Any, key: int) -> int:
    """Session or transaction advisory locks on *key* in this database, held by anyone."""
    n: int = outside.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        [key],
    ).fetchone()[0]
    return n


# 7: session-level advisory locks -------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_lock(4242)",
        "SELECT Pg_Advisory_Lock_Shared(4242)",
        "SELECT pg_try_advisory_lock(4242), pg_advisory_lock(0, 4242)",
    ],
)
async def test_session_advisory_locks_are_released_when_the_sandbox_closes(
    ad: Adapter, outside: Any, sql: str
) -> None:
    await ad.create()
    await ad.execute(sql)
    assert advisory_locks_held(outside, 4242) >= 1
    await ad.close()
    assert advisory_locks_held(outside, 4242) == 0
    # The next sandbox (on the same pooled connection) starts without them.
    await ad.create()
    assert await ad.fetchval("SELECT pg_try_advisory_lock(4242)") is True
    await ad.close()
    assert advisory_locks_held(outside, 4242) == 0


async def test_advisory_locks_of_a_nested_sandbox_are_released_with_it(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()  # e.g. a module fixture's level
    await ad.create()  # the test's
    await ad.execute("SELECT pg_advisory_lock(4242)")
    await ad.close()
    assert advisory_locks_held(outside, 4242) == 0
    await ad.create()
    await ad.execute("SELECT pg_advisory_lock(4242)")
    await ad.restore()
    assert advisory_locks_held(outside, 4242) == 0
    assert await ad.fetchval("SELECT 1") == 1  # still open
    await ad.close()
    await ad.close()


async def test_restoring_the_outer_sandbox_releases_advisory_locks(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    await ad.execute("SELECT pg_advisory_lock(4242)")
    await ad.restore()
    assert advisory_locks_held(outside, 4242) == 0
    await ad.close()


# 8: the sandbox's own savepoints -------------------------------------------------------


def sandbox_savepoints(ad: Adapter) -> list[str]:
    """The savepoints the sandbox holds open on its connection now, outermost first."""
    box = ad.db._router.owned()
    return [f.name.strip('"') for f in box.plan.stack if f.name]


@pytest.mark.parametrize("command", ["RELEASE SAVEPOINT", "RELEASE", "ROLLBACK TO SAVEPOINT"])
async def test_app_sql_cannot_name_the_sandboxs_own_savepoints(ad: Adapter, command: str) -> None:
    await ad.create()
    await ad.create()  # a nested level: a savepoint of the sandbox's own
    async with ad.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('kept')")
        await conn.commit()
        for which in (0, -1):  # the nested level's savepoint, the app transaction's
            await conn.execute("INSERT INTO item (name) VALUES ('gone')")
            name = sandbox_savepoints(ad)[which]
            # Production: the app never made it, so it does not exist; and the failed
            # statement aborts the app's transaction.
            with ad.raises("3B001") as info:
                await conn.execute(f"{command} {name}")
            assert f'savepoint "{name}" does not exist' in str(info.value)
            assert conn.status == "inerror"
            with ad.raises("25P02"):
                await conn.execute("SELECT 1")
            await conn.rollback()
            assert conn.status == "idle"
        assert await conn.fetch("SELECT name FROM item") == [("kept",)]
        await conn.commit()
    await ad.close()
    assert await ad.fetchval("SELECT count(*) FROM item") == 0
    await ad.close()


async def test_rolling_back_to_a_foreign_savepoint_in_a_failed_transaction(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('gone')")
        name = sandbox_savepoints(ad)[-1]
        with ad.raises("22012"):
            await conn.execute("SELECT 1 / 0")
        # Production answers ROLLBACK TO even in a failed transaction, which stays failed.
        with ad.raises("3B001"):
            await conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
        assert conn.status == "inerror"
        with ad.raises("25P02"):
            await conn.execute(f"RELEASE SAVEPOINT {name}")
        await conn.rollback()
        assert await conn.fetchval("SELECT count(*) FROM item") == 0
    await ad.close()


async def test_another_connections_savepoint_does_not_exist_for_the_app(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as first:
        await first.execute("INSERT INTO item (name) VALUES ('first')")
        await first.execute("SAVEPOINT mine")
        async with ad.connection() as second:  # same task: shares the connection
            await second.execute("INSERT INTO item (name) VALUES ('second')")
            with ad.raises("3B001"):
                await second.execute("ROLLBACK TO SAVEPOINT mine")
            await second.rollback()
        await first.execute("ROLLBACK TO SAVEPOINT mine")  # still there for its owner
        await first.commit()
        assert await first.fetch("SELECT name FROM item") == [("first",)]
    await ad.close()


async def test_savepoints_the_app_named_in_psycopg_blocks_are_its_own(ad: Adapter) -> None:
    if ad.name != "psycopg-sync":
        pytest.skip("savepoint_name is psycopg's (the logic is shared by sync and async)")
    await ad.create()
    with ad.db.connection() as conn:
        # Production: BEGIN; SAVEPOINT "Outer". Releasing it leaves the transaction open.
        with conn.transaction(savepoint_name="Outer"):
            conn.execute("INSERT INTO item (name) VALUES ('a')")
            conn.execute('RELEASE SAVEPOINT "Outer"')
            assert conn.info.transaction_status.name == "INTRANS"
            with conn.transaction(savepoint_name="sp_in"):
                conn.execute("INSERT INTO item (name) VALUES ('b')")
                conn.execute("ROLLBACK TO SAVEPOINT sp_in")  # kept, as in production
                conn.execute("INSERT INTO item (name) VALUES ('c')")
        assert conn.execute("SELECT name FROM item ORDER BY name").fetchall() == [("a",), ("c",)]
        conn.commit()  # so that the next block is an outer one again
        with conn.transaction(savepoint_name="Outer"):
            with pytest.raises(psycopg.errors.InvalidSavepointSpecification):
                conn.execute("ROLLBACK TO SAVEPOINT Outer")  # folded: not the app's name
            assert conn.info.transaction_status.name == "INERROR"
        # Leaving the failed block rolled it back (COMMIT of a failed transaction).
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (2,)
    await ad.close()


# Found by the differential test (test_differential.py) -----------------------------------


async def test_begin_in_a_failed_transaction_fails_as_in_production(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute("BEGIN")
        await conn.execute("BEGIN")  # production: a warning, no error
        with ad.raises("22012"):
            await conn.execute("SELECT 1 / 0")
        with ad.raises("25P02"):
            await conn.execute("BEGIN")
        assert conn.status == "inerror"
        await conn.execute("ROLLBACK")
        assert conn.status == "idle"
    await ad.close()


def _status(conn: Any) -> str:
    return str(conn.info.transaction_status.name)


def _outcome(fn: Any, conn: Any) -> tuple[str | None, str]:
    try:
        fn(conn)
    except psycopg.Error as exc:
        return exc.sqlstate, _status(conn)
    return None, _status(conn)


def _nested_commit_in_a_failed_transaction(conn: Any) -> None:
    conn.execute("SELECT 1")
    with conn.transaction(), pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")


def _nested_block_released_by_sql(conn: Any) -> None:
    conn.execute("SELECT 1")
    with conn.transaction(savepoint_name="sp"):
        conn.execute("RELEASE SAVEPOINT sp")


def _nested_block_committed_by_sql(conn: Any) -> None:
    conn.execute("SELECT 1")
    with conn.transaction():
        conn.execute("COMMIT")


def _outer_block_committed_by_sql_then_reopened(conn: Any) -> None:
    with conn.transaction():
        conn.execute("COMMIT")
        conn.execute("SELECT 1")  # a new transaction, which leaving the block commits


def _failed_rollback_of_a_block_is_logged(conn: Any) -> None:
    conn.execute("SELECT 1")
    with conn.transaction(force_rollback=True):
        conn.execute("COMMIT")  # the block's savepoint is gone: its rollback fails


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (_nested_commit_in_a_failed_transaction, ("25P02", "INERROR")),
        (_nested_block_released_by_sql, ("3B001", "INERROR")),
        (_nested_block_committed_by_sql, ("25P01", "IDLE")),
        (_outer_block_committed_by_sql_then_reopened, (None, "IDLE")),
        (_failed_rollback_of_a_block_is_logged, (None, "IDLE")),
    ],
)
async def test_leaving_a_psycopg_block_as_in_production(
    ad: Adapter, sandbox_dsn: str, scenario: Any, expected: tuple[str | None, str]
) -> None:
    if ad.name != "psycopg-sync":
        pytest.skip("psycopg's transaction() (its logic is shared by sync and async)")
    with psycopg.Connection.connect(sandbox_dsn) as plain:
        assert _outcome(scenario, plain) == expected  # production
        plain.rollback()
    await ad.create()
    conn = ad.db.getconn()
    try:
        assert _outcome(scenario, conn) == expected
    finally:
        ad.db.putconn(conn)
    await ad.close()


@pytest.mark.parametrize("sql", ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN", "ABORT AND CHAIN"])
async def test_chain_outside_a_transaction_fails_as_in_production(ad: Adapter, sql: str) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        with ad.raises("25P01"):
            await conn.execute(sql)
        assert conn.status == "idle"
        await conn.rollback()  # a no-op; the SQLAlchemy test adapter's error flag resets
        await conn.execute("BEGIN")
        await conn.execute(sql)  # in a transaction: ends it and begins the next
        assert conn.status == "intrans"
        await conn.execute("ROLLBACK")
    await ad.close()
