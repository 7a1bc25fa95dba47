"""The sandbox's behaviour spec (issue 3, items 1-12), run against every adapter (``ad``).

Each test talks to a real PostgreSQL; ``outside`` is an independent connection that
sees only what was really committed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from corral.errors import (
    SandboxBroken,
    SandboxError,
    SandboxLockTimeout,
    SandboxNotActive,
    UnsupportedStatement,
)
from tests.sandbox._adapters import Adapter

pytestmark = pytest.mark.asyncio


def count_outside(outside: Any, where: str = "true") -> int:
    n: int = outside.execute(f"SELECT count(*) FROM item WHERE {where}").fetchone()[0]
    return n


async def count(ad: Adapter, where: str = "true") -> int:
    n: int = await ad.fetchval(f"SELECT count(*) FROM item WHERE {where}")
    return n


# 1 -------------------------------------------------------------------------------------


async def test_rows_visible_inside_gone_after_close_never_outside(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('one'), ('two')")
    assert await count(ad) == 2
    assert count_outside(outside) == 0
    await ad.close()
    assert count_outside(outside) == 0
    await ad.create()
    assert await count(ad) == 0
    await ad.close()


# 2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 50])
async def test_concurrent_sandboxes_each_see_only_their_own_rows(
    ad: Adapter, outside: Any, n: int
) -> None:
    await ad.aclose()
    await ad.open(max_size=n)
    everyone_wrote = ad.event()
    wrote: list[int] = []

    async def worker(i: int) -> tuple[int, list[str]]:
        await ad.create()
        try:
            await ad.execute("INSERT INTO item (name) VALUES (%s), (%s)", (f"w{i}a", f"w{i}b"))
            # Everyone has written before anyone reads: isolation, not luck of timing.
            wrote.append(i)
            if len(wrote) == n:
                everyone_wrote.set()
            await everyone_wrote.wait()
            async with ad.connection() as conn:
                rows = await conn.fetch("SELECT name FROM item ORDER BY name")
            return i, [r[0] for r in rows]
        finally:
            await ad.close()

    results = await ad.concurrently(n, worker)
    assert sorted(i for i, _ in results) == list(range(n))
    for i, names in results:
        assert names == [f"w{i}a", f"w{i}b"]
    assert count_outside(outside) == 0


# 3 -------------------------------------------------------------------------------------


async def test_app_transactions_nest_and_inner_rollback_discards_only_inner(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO item (name) VALUES ('outer')")
            with pytest.raises(ZeroDivisionError):  # noqa: PT012
                async with conn.transaction():
                    await conn.execute("INSERT INTO item (name) VALUES ('inner')")
                    async with conn.transaction():
                        await conn.execute("INSERT INTO item (name) VALUES ('innermost')")
                    raise ZeroDivisionError
            async with conn.transaction():
                await conn.execute("INSERT INTO item (name) VALUES ('sibling')")
        names = [r[0] for r in await conn.fetch("SELECT name FROM item ORDER BY name")]
    assert names == ["outer", "sibling"]
    await ad.close()


async def test_error_in_app_transaction_rolls_back_to_it_and_sandbox_stays_usable(
    ad: Adapter,
) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('kept')")
    with ad.raises("23505"):
        async with ad.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO item (name) VALUES ('lost')")
            await conn.execute("INSERT INTO item (name) VALUES ('kept')")
    # No InFailedSqlTransaction: the next statement just works.
    async with ad.connection() as conn:
        assert [r[0] for r in await conn.fetch("SELECT name FROM item")] == ["kept"]
        # Inside an app transaction, production semantics: the transaction is failed
        # until the app rolls back, then the connection is usable again.
        await conn.execute("INSERT INTO item (name) VALUES ('x')")
        with ad.raises("22012"):
            await conn.execute("SELECT 1/0")
        assert conn.status == "inerror"
        with ad.raises("25P02"):
            await conn.execute("SELECT 1")
        await conn.rollback()
        assert conn.status == "idle"
        assert await conn.fetchval("SELECT count(*) FROM item") == 1
    await ad.close()


# 4 -------------------------------------------------------------------------------------


async def test_what_commits_in_production_only_commits_to_the_sandbox(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('by-exit')")  # leaving connection()
    async with ad.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('by-commit')")
        await conn.commit()
        await conn.execute("INSERT INTO item (name) VALUES ('rolled-back')")
        await conn.rollback()
        assert conn.status == "idle"
    with pytest.raises(RuntimeError):  # noqa: PT012
        async with ad.connection() as conn:
            await conn.execute("INSERT INTO item (name) VALUES ('by-error-exit')")
            raise RuntimeError
    names = {r[0] for r in await _fetch(ad, "SELECT name FROM item")}
    assert names == {"by-exit", "by-commit"}
    assert count_outside(outside) == 0
    await ad.close()
    assert count_outside(outside) == 0


async def _fetch(ad: Adapter, sql: str) -> list[tuple[Any, ...]]:
    async with ad.connection() as conn:
        rows: list[tuple[Any, ...]] = await conn.fetch(sql)
    return rows


@pytest.mark.parametrize(
    ("begin", "end", "kept"),
    [
        ("BEGIN", "COMMIT", True),
        ("START TRANSACTION", "END", True),
        ("begin work", "commit work", True),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", "COMMIT", True),
        ("BEGIN", "ROLLBACK", False),
        ("BEGIN", "ABORT", False),
        ("START TRANSACTION READ WRITE", "ROLLBACK WORK", False),
    ],
)
async def test_sql_text_transaction_control_becomes_savepoints(
    ad: Adapter, outside: Any, begin: str, end: str, kept: bool
) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute(begin)
        assert conn.status == "intrans"
        await conn.execute("INSERT INTO item (name) VALUES ('t')")
        await conn.execute(end)
        assert conn.status == "idle"
        assert await conn.fetchval("SELECT count(*) FROM item") == (1 if kept else 0)
    assert count_outside(outside) == 0
    await ad.close()


async def test_script_with_transaction_control(ad: Adapter, outside: Any) -> None:
    if not ad.scripts:
        pytest.skip(f"{ad.name} prepares every statement: scripts fail in production too")
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute(
            "BEGIN; INSERT INTO item (name) VALUES ('a;b'); COMMIT; "
            "BEGIN; INSERT INTO item (name) VALUES ('c'); ROLLBACK"
        )
        assert [r[0] for r in await conn.fetch("SELECT name FROM item")] == ["a;b"]
    assert count_outside(outside) == 0
    await ad.close()


async def test_autocommit_gets_a_savepoint_per_statement(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute("INSERT INTO item (name) VALUES ('first')")
        with ad.raises("23505"):
            await conn.execute("INSERT INTO item (name) VALUES ('first')")
        assert conn.status == "idle"
        await conn.execute("INSERT INTO item (name) VALUES ('second')")
        names = [r[0] for r in await conn.fetch("SELECT name FROM item ORDER BY name")]
    assert names == ["first", "second"]
    await ad.close()


async def test_app_savepoints_in_sql_text(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        with ad.raises("25P01"):
            await conn.execute("SAVEPOINT outside_tx")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO item (name) VALUES ('a')")
        await conn.execute('SAVEPOINT "My Point"')
        await conn.execute("INSERT INTO item (name) VALUES ('b')")
        await conn.execute('ROLLBACK TO SAVEPOINT "My Point"')
        await conn.execute("INSERT INTO item (name) VALUES ('c')")
        await conn.execute('RELEASE "My Point"')
        await conn.execute("COMMIT")
        names = [r[0] for r in await conn.fetch("SELECT name FROM item ORDER BY name")]
    assert names == ["a", "c"]
    await ad.close()


# 5 -------------------------------------------------------------------------------------


async def test_app_sees_production_transaction_status(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        assert conn.status == "idle"
        await conn.execute("SELECT 1")
        assert conn.status == "intrans"  # psycopg's implicit transaction
        await conn.commit()
        assert conn.status == "idle"
        async with conn.transaction():
            await conn.execute("SELECT 1")  # SQLAlchemy begins lazily, at the first statement
            assert conn.status == "intrans"
        assert conn.status == "idle"
        await conn.set_autocommit(True)
        await conn.execute("SELECT 1")
        assert conn.status == "idle"
    await ad.close()


# 6 -------------------------------------------------------------------------------------


async def test_deferred_constraints_are_checked_at_the_app_commit(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        async with conn.transaction():
            # Child first, parent second: legal because the FK is deferred.
            await conn.execute("INSERT INTO child VALUES (1, 10)")
            await conn.execute("INSERT INTO parent VALUES (10)")
        with ad.raises("23503"):
            async with conn.transaction():
                await conn.execute("INSERT INTO child VALUES (2, 99)")
                assert await conn.fetchval("SELECT count(*) FROM child") == 2  # not yet checked
        assert conn.status == "idle"
        await conn.execute("INSERT INTO child VALUES (3, 77)")
        with ad.raises("23503"):
            await conn.commit()
        await conn.rollback()  # SQLAlchemy requires it after a failed commit; else a no-op
        assert conn.status == "idle"
        assert await conn.fetchval("SELECT count(*) FROM child") == 1
        await conn.commit()
    await ad.close()


# 7 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("VACUUM item", "VACUUM"),
        ("vacuum (analyze) item", "VACUUM"),
        ("CREATE DATABASE never", "CREATE DATABASE"),
        ("DROP DATABASE never", "DROP DATABASE"),
        ("CREATE INDEX CONCURRENTLY ON item (note)", "CREATE INDEX CONCURRENTLY"),
        ("create unique index concurrently i ON item (note)", "CREATE INDEX CONCURRENTLY"),
        ("DROP INDEX CONCURRENTLY IF EXISTS nope", "DROP INDEX CONCURRENTLY"),
        ("REINDEX TABLE CONCURRENTLY item", "REINDEX CONCURRENTLY"),
        ("ALTER SYSTEM SET work_mem = '8MB'", "ALTER SYSTEM"),
        ("/* hi */ -- there\n  CREATE TABLESPACE t LOCATION '/tmp'", "CREATE TABLESPACE"),
    ],
)
async def test_statements_refused_in_a_transaction_raise_sandbox_error(
    ad: Adapter, sql: str, command: str
) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('before')")
        with pytest.raises(UnsupportedStatement) as info:
            await conn.execute(sql)
        assert isinstance(info.value, SandboxError)
        assert info.value.statement == command
        assert command in str(info.value)
        assert "no_sandbox" in str(info.value)
        assert await conn.fetchval("SELECT count(*) FROM item") == 1
    await ad.close()


# 8 -------------------------------------------------------------------------------------


async def test_concurrent_users_of_one_sandbox_are_serialised(ad: Adapter) -> None:
    await ad.create()

    async def unit(i: int) -> None:
        async with ad.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO item (name) VALUES (%s)", (f"u{i}",))
            await conn.execute("SELECT pg_sleep(0.01)")
            await conn.execute("UPDATE item SET note = %s WHERE name = %s", (f"n{i}", f"u{i}"))

    if ad.is_async:
        await asyncio.gather(*(unit(i) for i in range(4)))
    else:
        # Threads let into this test's sandbox take turns on its one connection.
        threads = [
            threading.Thread(target=ad.db.allow(lambda i=i: asyncio.run(unit(i)))) for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    rows = await _fetch(ad, "SELECT name, note FROM item ORDER BY name")
    assert rows == [(f"u{i}", f"n{i}") for i in range(4)]
    await ad.close()


# 9 -------------------------------------------------------------------------------------


async def test_query_without_a_sandbox_raises_not_active(ad: Adapter, outside: Any) -> None:
    # SQLAlchemy may wrap it in a StatementError: the app's handlers see it either way.
    with pytest.raises(Exception) as info:
        await ad.execute("INSERT INTO item (name) VALUES ('never')")
    assert isinstance(ad.original(info.value), SandboxNotActive), info.value
    assert "allow" in str(info.value)
    await ad.create()
    await ad.close()
    with pytest.raises(Exception) as info:
        await ad.fetchval("SELECT 1")
    assert isinstance(ad.original(info.value), SandboxNotActive), info.value
    assert count_outside(outside) == 0


async def test_other_threads_need_allow_or_shared_mode(ad: Adapter) -> None:
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('test-data')")
    results: dict[str, Any] = {}

    def server(key: str) -> None:
        try:
            results[key] = asyncio.run(count(ad))
        except Exception as exc:
            results[key] = exc

    def in_thread(target: Any, name: str) -> None:
        t = threading.Thread(target=target, args=(name,))
        t.start()
        t.join(30)

    in_thread(server, "plain")
    assert isinstance(results["plain"], SandboxNotActive)
    if not ad.cross_loop:
        await ad.close()
        pytest.skip(f"{ad.name} connections belong to one event loop: use allow() on tasks")

    t = threading.Thread(target=server, args=("allowed",))
    ad.db.allow(t)
    t.start()
    t.join(30)
    assert results["allowed"] == 1

    in_thread(ad.db.allow(server), "wrapped")
    assert results["wrapped"] == 1

    with ad.db.share():
        in_thread(server, "shared")
    assert results["shared"] == 1
    in_thread(server, "unshared")
    assert isinstance(results["unshared"], SandboxNotActive)

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ad.db.allow(pool)
        assert pool.submit(lambda: asyncio.run(count(ad))).result(30) == 1
    await ad.close()


async def test_allow_an_asyncio_task(ad: Adapter) -> None:
    if not ad.is_async:
        pytest.skip("tasks belong to async adapters")
    await ad.create()
    await ad.execute("INSERT INTO item (name) VALUES ('x')")
    gate = asyncio.Event()

    async def job() -> int:
        await gate.wait()
        return await count(ad)

    # A task created from a context without the sandbox (e.g. by a server's loop).
    import contextvars

    task = asyncio.get_running_loop().create_task(job(), context=contextvars.Context())
    ad.db.allow(task)
    gate.set()
    assert await task == 1
    orphan = asyncio.get_running_loop().create_task(count(ad), context=contextvars.Context())
    with pytest.raises(SandboxNotActive):
        await orphan
    await ad.close()


# 10 ------------------------------------------------------------------------------------


async def test_killed_backend_fails_the_test_clearly_and_the_pool_recovers(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    pid = await ad.fetchval("SELECT pg_backend_pid()")
    outside.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(ad.disconnect_error) as info:
        await ad.fetchval("SELECT 1")
    assert "terminated" in "\n".join(getattr(ad.original(info.value), "__notes__", []))
    with pytest.raises(SandboxBroken):
        await ad.fetchval("SELECT 1")
    await ad.close()
    for _ in range(3):  # the next sandboxes get healthy connections
        await ad.create()
        assert await ad.fetchval("SELECT pg_backend_pid()") != pid
        await ad.execute("INSERT INTO item (name) VALUES ('again')")
        await ad.close()
    assert count_outside(outside) == 0


async def test_a_connection_dead_in_the_pool_is_replaced_at_create(
    ad: Adapter, outside: Any
) -> None:
    await ad.create()
    pid = await ad.fetchval("SELECT pg_backend_pid()")
    await ad.close()  # back to the pool, idle
    outside.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await asyncio.sleep(0.05)
    await ad.create()
    assert await ad.fetchval("SELECT 1") == 1
    await ad.close()


# 11 ------------------------------------------------------------------------------------


#: Message languages a server may have (``lc_messages``): the lock-timeout test runs in the
#: first one the server accepts, so its detection cannot rest on English text.
_LANGUAGES = ("de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "es_ES.UTF-8")


def _foreign_lc_messages(outside: Any) -> str | None:
    for name in _LANGUAGES:
        try:
            outside.execute(f"SET lc_messages = '{name}'")
        except Exception:  # the server has no such locale, or we may not set it
            continue
        outside.execute("RESET lc_messages")
        return name
    return None


async def test_lock_contention_between_sandboxes_ends_in_a_clear_bounded_error(
    ad: Adapter, outside: Any
) -> None:
    await ad.aclose()
    ad = type(ad)(ad.dsn, lock_timeout=0.3)
    await ad.open(max_size=2)
    holder_has_row, release = ad.event(), ad.event()
    # Known by its SQLSTATE (and the server function raising it), whatever the language.
    language = _foreign_lc_messages(outside)

    async def holder() -> None:
        await ad.create()
        await ad.execute("INSERT INTO item (name) VALUES ('same-key')")
        holder_has_row.set()
        await release.wait()
        await ad.close()

    async def contender() -> BaseException | None:
        await holder_has_row.wait()
        await ad.create()
        if language is not None:
            await ad.execute(f"SET lc_messages = '{language}'")  # undone with the sandbox
        started = time.monotonic()
        try:
            await ad.execute("INSERT INTO item (name) VALUES ('same-key')")
        except BaseException as exc:
            # Bounded: the wait ended after ~lock_timeout, not when the holder ended.
            assert time.monotonic() - started < 5
            return exc
        finally:
            release.set()
            await ad.close()
        return None

    async def run(i: int) -> BaseException | None:
        if i == 0:
            await holder()
            return None
        return await contender()

    try:
        err = (await ad.concurrently(2, run))[1]
    finally:
        await ad.aclose()
    assert err is not None
    assert isinstance(ad.original(err), SandboxLockTimeout), err
    assert ad.sqlstate(err) == "55P03"  # the driver's LockNotAvailable: app handlers work
    assert isinstance(ad.original(err), TimeoutError)
    assert "lock contention" in str(err)
    assert "item_name_key" in str(err)  # names the contended index / relation
    assert count_outside(outside) == 0


async def test_nowait_finding_a_lock_taken_is_the_servers_error_not_contention(
    ad: Adapter,
) -> None:
    """NOWAIT fails with the same SQLSTATE as a lock timeout (55P03); it did not wait, so
    it is no contention report: the app's own error, as in production."""
    await ad.aclose()
    ad = type(ad)(ad.dsn, lock_timeout=0.3)
    await ad.open(max_size=2)
    holder_has_lock, release = ad.event(), ad.event()

    async def run(i: int) -> BaseException | None:
        if i == 0:
            await ad.create()
            await ad.execute("INSERT INTO item (name) VALUES ('held')")  # ROW EXCLUSIVE
            holder_has_lock.set()
            await release.wait()
            await ad.close()
            return None
        await holder_has_lock.wait()
        await ad.create()
        try:
            await ad.execute("LOCK TABLE item IN SHARE MODE NOWAIT")
        except BaseException as exc:
            return exc
        finally:
            release.set()
            await ad.close()
        return None

    try:
        err = (await ad.concurrently(2, run))[1]
    finally:
        await ad.aclose()
    assert err is not None
    assert ad.sqlstate(err) == "55P03"
    assert not isinstance(ad.original(err), SandboxLockTimeout), err
    assert "lock contention" not in str(err)


async def test_deferred_constraints_in_autocommit_fail_the_statement_itself(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as conn:
        await conn.set_autocommit(True)
        await conn.execute("INSERT INTO parent VALUES (1)")
        # Each autocommit statement commits in production: its deferred FK is checked
        # at its end, so it is this statement that fails, and only it.
        with ad.raises("23503"):
            await conn.execute("INSERT INTO child VALUES (1, 404)")
        await conn.execute("INSERT INTO child VALUES (2, 1)")
        assert await conn.fetchval("SELECT count(*) FROM child") == 1
        assert await conn.fetchval("SELECT count(*) FROM parent") == 1
    await ad.close()


async def test_nested_checkouts_of_one_task_share_the_sandbox(ad: Adapter) -> None:
    await ad.create()
    async with ad.connection() as outer:
        await outer.execute("INSERT INTO item (name) VALUES ('outer')")
        async with ad.connection() as inner:  # same task: re-entrant, no deadlock
            assert await inner.fetchval("SELECT count(*) FROM item") == 1  # a known limit
            await inner.execute("INSERT INTO item (name) VALUES ('inner')")
        await outer.commit()
    assert await count(ad) == 2
    await ad.close()
