"""psycopg-specific surface of the sandbox proxies: what a psycopg app calls keeps working."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import psycopg_pool
import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.rows import dict_row

from corral.errors import SandboxError
from corral.sandbox import AsyncSandboxConnection, SandboxConnection, sandbox


@pytest.fixture
def db(sandbox_dsn: str) -> Iterator[Any]:
    with psycopg_pool.ConnectionPool(sandbox_dsn, min_size=1, max_size=2) as pool:
        handle: Any = sandbox(pool, mode="sandbox")
        with handle.sandboxed():
            yield handle


@pytest_asyncio.fixture
async def adb(sandbox_dsn: str) -> AsyncIterator[Any]:
    pool = psycopg_pool.AsyncConnectionPool(sandbox_dsn, min_size=1, max_size=2, open=False)
    await pool.open()
    try:
        handle: Any = sandbox(pool, mode="sandbox")
        await handle.create_sandbox()
        yield handle
        await handle.close_sandbox()
    finally:
        await pool.close()


def count(conn: Any) -> int:
    n: int = conn.execute("SELECT count(*) FROM item").fetchone()[0]
    return n


def test_rollback_exception_and_force_rollback(db: Any) -> None:
    with db.connection() as conn:
        assert isinstance(conn, SandboxConnection)
        with conn.transaction() as tx:
            conn.execute("INSERT INTO item (name) VALUES ('a')")
            with conn.transaction():
                conn.execute("INSERT INTO item (name) VALUES ('b')")
                raise psycopg.Rollback(tx)  # type: ignore[arg-type]
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO item (name) VALUES ('c')")
        with conn.transaction(savepoint_name="Named Point") as named:
            assert named.savepoint_name == "Named Point"
            conn.execute("INSERT INTO item (name) VALUES ('d')")
        assert [r[0] for r in conn.execute("SELECT name FROM item ORDER BY 1")] == ["d"]


def test_production_errors_for_misuse(db: Any) -> None:
    with db.connection() as conn, conn.transaction():
        with pytest.raises(psycopg.ProgrammingError, match="commit"):
            conn.commit()
        with pytest.raises(psycopg.ProgrammingError, match="autocommit"):
            conn.autocommit = True
        with pytest.raises(SandboxError, match="two-phase"):
            conn.tpc_begin("x")


def test_read_only_transactions(db: Any) -> None:
    with db.connection() as conn:
        conn.read_only = True
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO item (name) VALUES ('no')")
        conn.rollback()
        conn.read_only = None
        conn.execute("INSERT INTO item (name) VALUES ('yes')")  # read-write again
        conn.commit()
        conn.autocommit = True
        conn.execute("BEGIN READ ONLY")
        assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
        conn.execute("COMMIT")
        assert conn.execute("SHOW transaction_read_only").fetchone() == ("off",)
        conn.execute("START TRANSACTION")
        conn.execute("SET TRANSACTION READ ONLY")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM item")
        conn.execute("ROLLBACK")
        assert count(conn) == 1


def test_commit_and_chain(db: Any) -> None:
    with db.connection() as conn:
        conn.autocommit = True
        conn.execute("BEGIN")
        conn.execute("INSERT INTO item (name) VALUES ('a')")
        conn.execute("COMMIT AND CHAIN")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.execute("INSERT INTO item (name) VALUES ('b')")
        conn.execute("ROLLBACK")
        assert count(conn) == 1


def test_cursor_api(db: Any) -> None:
    with db.connection() as conn:
        with conn.cursor() as cur:
            assert cur.connection is conn
            cur.executemany(
                "INSERT INTO item (name, note) VALUES (%s, %s)", [(f"n{i}", "x") for i in range(5)]
            )
            assert cur.execute("SELECT count(*) FROM item").fetchone() == (5,)
            assert [r[0] for r in cur.stream("SELECT name FROM item ORDER BY name")][:2] == [
                "n0",
                "n1",
            ]
            with cur.copy("COPY item (name) FROM STDIN") as copy:
                copy.write_row(("copied",))
            query = sql.SQL("SELECT {} FROM {} WHERE name = %s").format(
                sql.Identifier("note"), sql.Identifier("item")
            )
            assert cur.execute(query, ("n3",)).fetchone() == ("x",)
            assert list(cur.execute("SELECT 1 UNION ALL SELECT 2")) == [(1,), (2,)]
        with conn.cursor(row_factory=dict_row) as cur:
            assert cur.execute("SELECT 1 AS one").fetchone() == {"one": 1}
        with conn.cursor("server_side") as named:
            named.execute("SELECT name FROM item ORDER BY name")
            assert named.fetchmany(2) == [("copied",), ("n0",)]
        with conn.pipeline() as p:
            conn.execute("INSERT INTO item (name) VALUES ('piped')")
            p.sync()
        assert count(conn) == 7


def test_failing_statement_in_stream_rolls_back_only_itself(db: Any) -> None:
    with db.connection() as conn:
        conn.autocommit = True
        conn.execute("INSERT INTO item (name) VALUES ('kept')")
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.DivisionByZero):
            list(cur.stream("SELECT 1/0"))
        assert count(conn) == 1


def test_putconn_rolls_back_an_open_transaction(db: Any) -> None:
    conn = db.getconn()
    conn.execute("INSERT INTO item (name) VALUES ('abandoned')")
    db.putconn(conn)
    with pytest.raises(psycopg.OperationalError, match="closed"):
        conn.execute("SELECT 1")
    with db.connection() as again:
        assert count(again) == 0


def test_normal_psycopg_errors_are_untouched(db: Any) -> None:
    with db.connection() as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM nope")
        conn.rollback()
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")


@pytest.mark.asyncio
async def test_async_surface(adb: Any) -> None:
    async with adb.connection() as conn:
        assert isinstance(conn, AsyncSandboxConnection)
        async with conn.transaction() as tx:
            await conn.execute("INSERT INTO item (name) VALUES ('a')")
            async with conn.transaction():
                await conn.execute("INSERT INTO item (name) VALUES ('b')")
                raise psycopg.Rollback(tx)  # type: ignore[arg-type]
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO item (name) VALUES (%s)", [("x",), ("y",)])
            rows = [r async for r in cur.stream("SELECT name FROM item ORDER BY name")]
            assert rows == [("x",), ("y",)]
            async with cur.copy("COPY item (name) FROM STDIN") as copy:
                await copy.write_row(("copied",))
            await cur.execute("SELECT count(*) FROM item")
            assert await cur.fetchone() == (3,)
        with pytest.raises(psycopg.ProgrammingError):
            async with conn.transaction():
                await conn.commit()
        await conn.commit()
        await conn.set_autocommit(True)
        await conn.execute("BEGIN")
        await conn.execute("DELETE FROM item")
        await conn.execute("ROLLBACK")
        cur = await conn.execute("SELECT count(*) FROM item")
        assert await cur.fetchone() == (3,)


#: psycopg's connection settings: (name, a value to set, the new connection's value)
SETTINGS = [
    ("autocommit", True, False),
    ("read_only", True, None),
    ("isolation_level", psycopg.IsolationLevel.SERIALIZABLE, None),
    ("deferrable", True, None),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "value", "default"), SETTINGS)
async def test_async_settings_refuse_assignment_as_psycopg(
    adb: Any, sandbox_dsn: str, name: str, value: Any, default: Any
) -> None:
    refused = rf"read-only on async connections: please use 'await \.set_{name}\(\)' instead"
    real = await psycopg.AsyncConnection.connect(sandbox_dsn)
    try:
        with pytest.raises(AttributeError, match=refused):
            setattr(real, name, value)
    finally:
        await real.close()
    async with adb.connection() as conn:
        with pytest.raises(AttributeError, match=refused):
            setattr(conn, name, value)
        assert getattr(conn, name) == default
        await getattr(conn, f"set_{name}")(value)
        assert getattr(conn, name) == value


@pytest.mark.parametrize(("name", "value", "default"), SETTINGS)
def test_sync_settings_change_outside_a_transaction_only(
    db: Any, name: str, value: Any, default: Any
) -> None:
    with db.connection() as conn:
        assert getattr(conn, name) == default
        setattr(conn, name, value)
        assert getattr(conn, name) == value
        getattr(conn, f"set_{name}")(default)
        assert getattr(conn, name) == default
        conn.execute("SELECT 1")  # opens a transaction
        with pytest.raises(psycopg.ProgrammingError, match=name):
            setattr(conn, name, value)
        with pytest.raises(psycopg.ProgrammingError, match=name):
            getattr(conn, f"set_{name}")(value)
        assert getattr(conn, name) == default


def test_settings_of_the_real_connection_pass_through(db: Any) -> None:
    with db.connection() as conn:
        real = conn.pgconn  # attributes the proxy does not emulate come from psycopg
        assert real is conn._real.pgconn
        conn.prepare_threshold = None
        assert conn._real.prepare_threshold is None
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE  # recorded, documented
        assert conn.isolation_level == psycopg.IsolationLevel.SERIALIZABLE
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.ProgrammingError, match="isolation_level"):
            conn.isolation_level = None
        conn.prepare_threshold = 5
