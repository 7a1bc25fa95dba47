"""Several handles on one database share a context's sandbox (issue 15, pattern 2).

Joining, the per-level membership, the closing rules and the opt-out, per driver kind.
The end-to-end patterns (an app's rw/ro engines, a pool beside an engine) are in
``tests/plugin/test_patterns.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import pytest
import pytest_asyncio
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from corral.errors import SandboxError
from corral.sandbox import sandbox
from corral.sandbox._sqlalchemy import _ENGINES
from corral.sandbox._targets import target
from tests.sandbox._adapters import asyncpg_params, sqlalchemy_url


@pytest.fixture
def pool(sandbox_dsn: str) -> Iterator[Any]:
    with psycopg_pool.ConnectionPool(sandbox_dsn, min_size=1, max_size=2) as real:
        yield real


@pytest.fixture
def engines(sandbox_dsn: str) -> Iterator[list[sqlalchemy.Engine]]:
    """Two engines on the module's database; sandboxed by the test, unhooked after it."""
    made = [sqlalchemy.create_engine(sqlalchemy_url(sandbox_dsn, "psycopg")) for _ in range(2)]
    yield made
    for engine in made:
        hooks = _ENGINES.get(engine)
        if hooks is not None:
            hooks.close_idle()
            hooks.remove()
        engine.dispose()


def box_of(handle: Any) -> Any:
    """The sandbox *handle* uses in this context."""
    return handle._router.owned()


def count(db: Any) -> int:
    with db.connection() as conn:
        row = conn.execute("SELECT count(*) FROM item").fetchone()
    return int(row[0])


def engine_count(engine: sqlalchemy.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM item")).scalar_one())


def test_the_target_is_read_from_a_url_a_conninfo_or_keywords() -> None:
    url = target("postgresql://u@db.example:6000/app?sslmode=require")
    assert url == ("db.example", "6000", "app")
    assert target("host=db.example port=6000 dbname=app user=u") == url
    assert target("postgresql://u@db.example:6000/x", {"dbname": "app"}) == url
    assert target(None, {"host": "db.example", "port": 6000, "database": "app"}) == url
    assert target("postgresql://u@db.example:6000/other") != url


def test_a_pool_and_an_engine_share_one_transaction(
    pool: Any, engines: list[sqlalchemy.Engine], outside: Any
) -> None:
    db = sandbox(pool, mode="sandbox")
    rw, ro = sandbox(engines[0], mode="sandbox"), sandbox(engines[1], mode="sandbox")
    for handle in (db, rw, ro):
        handle.create_sandbox()
    box = box_of(db)
    assert box_of(rw) is box
    assert box_of(ro) is box
    assert box.members == [[db, rw, ro]]
    try:
        # A read transaction open on the read-only engine, across another handle's commit:
        with Session(engines[1]) as reader:
            assert reader.execute(text("SELECT count(*) FROM item")).scalar() == 0
            with Session(engines[0]) as writer:
                writer.execute(text("INSERT INTO item (name) VALUES ('rw')"))
                writer.commit()
            with db.connection() as conn:
                conn.execute("INSERT INTO item (name) VALUES ('pool')")
            # READ COMMITTED: the open read transaction sees both commits, as in production
            assert reader.execute(text("SELECT count(*) FROM item")).scalar() == 2
        # ... and closing it (a rollback) undoes neither.
        assert count(db) == engine_count(engines[0]) == engine_count(engines[1]) == 2
    finally:
        for handle in (ro, rw, db):
            handle.close_sandbox()
    assert box.closed
    assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0


def test_nested_levels_are_shared_and_closed_by_their_last_handle(
    pool: Any, engines: list[sqlalchemy.Engine]
) -> None:
    db, eng = sandbox(pool, mode="sandbox"), sandbox(engines[0], mode="sandbox")
    db.create_sandbox()
    eng.create_sandbox()  # a fixture scope's level, joined
    with db.connection() as conn:
        conn.execute("INSERT INTO item (name) VALUES ('scope')")
    db.create_sandbox()  # the test's level: one savepoint...
    eng.create_sandbox()  # ...joined, not a second one
    box = box_of(db)
    assert box.members == [[db, eng], [db, eng]]
    assert box.plan.depth == 2
    with Session(engines[0]) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('test')"))
        session.commit()
    assert count(db) == 2
    eng.close_sandbox()
    db.close_sandbox()
    assert box.plan.depth == 1
    assert box_of(eng) is box
    assert engine_count(engines[0]) == 1  # the test's row is gone, the scope's stays
    # Closed in either order within a level: the last one rolls it back.
    db.close_sandbox()
    assert not box.closed
    assert box_of(db) is None
    assert engine_count(engines[0]) == 1
    eng.close_sandbox()
    assert box.closed


def test_one_handle_closing_leaves_anothers_open_transaction_alone(
    pool: Any, engines: list[sqlalchemy.Engine], outside: Any
) -> None:
    db, eng = sandbox(pool, mode="sandbox"), sandbox(engines[0], mode="sandbox")
    db.create_sandbox()
    eng.create_sandbox()
    with Session(engines[0]) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('open')"))
        db.close_sandbox()  # the session's transaction is the engine's: it goes on
        with pytest.raises(SandboxError, match="no sandbox"):
            db.getconn()
        session.commit()
        assert session.execute(text("SELECT count(*) FROM item")).scalar() == 1
    eng.close_sandbox()
    assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0


def test_closing_in_the_wrong_order_names_the_handles(
    pool: Any, engines: list[sqlalchemy.Engine]
) -> None:
    db, eng = sandbox(pool, mode="sandbox"), sandbox(engines[0], mode="sandbox")
    db.create_sandbox()
    eng.create_sandbox()
    eng.create_sandbox()  # a level of the engine's alone, inside the shared one
    with pytest.raises(SandboxError, match=r"wrong order.*sandbox\(Engine.*own_connection"):
        db.close_sandbox()
    eng.close_sandbox()
    db.close_sandbox()
    eng.close_sandbox()
    assert box_of(db) is None
    assert box_of(eng) is None


def test_own_connection_and_independent_sandboxes_stay_apart(
    pool: Any, engines: list[sqlalchemy.Engine], sandbox_dsn: str
) -> None:
    db = sandbox(pool, mode="sandbox")
    own = sandbox(engines[0], mode="sandbox", own_connection=True)
    other = sandbox(engines[1], mode="sandbox")
    db.create_sandbox()
    own.create_sandbox()
    other.create_sandbox(nest=False)  # explicitly independent: never joins
    boxes = {id(box_of(h)) for h in (db, own, other)}
    assert len(boxes) == 3
    with db.connection() as conn:
        conn.execute("INSERT INTO item (name) VALUES ('pool')")
    assert engine_count(engines[0]) == engine_count(engines[1]) == 0
    for handle in (other, own, db):
        handle.close_sandbox()


@pytest_asyncio.fixture
async def apool(sandbox_dsn: str) -> AsyncIterator[Any]:
    real = await asyncpg.create_pool(min_size=1, max_size=2, **asyncpg_params(sandbox_dsn))
    try:
        yield real
    finally:
        await real.close()


@pytest.mark.asyncio
async def test_async_handles_share_by_driver(apool: Any, sandbox_dsn: str) -> None:
    on_asyncpg = create_async_engine(sqlalchemy_url(sandbox_dsn, "asyncpg"))
    on_psycopg = create_async_engine(sqlalchemy_url(sandbox_dsn, "psycopg"))
    db = sandbox(apool, mode="sandbox")
    same, other = sandbox(on_asyncpg, mode="sandbox"), sandbox(on_psycopg, mode="sandbox")
    try:
        for handle in (db, same, other):
            await handle.create_sandbox()
        assert box_of(db) is box_of(same)
        assert box_of(other) is not box_of(db)  # another driver: apart
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO item (name) VALUES ('pool')")
        async with on_asyncpg.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM item"))).scalar() == 1
        async with on_psycopg.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM item"))).scalar() == 0
        for handle in (other, same, db):
            await handle.close_sandbox()
    finally:
        await db.close()  # its kept connections back to the pool
        for engine, handle in ((on_asyncpg, same), (on_psycopg, other)):
            await handle.close()
            handle.remove()
            await engine.dispose()


def test_a_connection_factory_keeps_its_own_connection(pool: Any, sandbox_dsn: str) -> None:
    db = sandbox(pool, mode="sandbox")
    opaque = sandbox(lambda **kw: psycopg.connect(sandbox_dsn, **kw), mode="sandbox")
    by_string = sandbox(sandbox_dsn, mode="sandbox")
    db.create_sandbox()
    opaque.create_sandbox()
    by_string.create_sandbox()
    try:
        assert box_of(opaque) is not box_of(db)
        assert box_of(by_string) is box_of(db)
    finally:
        for handle in (by_string, opaque, db):
            handle.close_sandbox()
        opaque.close()
        by_string.close()


def test_a_no_sandbox_test_closes_shared_levels_in_order(
    pool: Any, engines: list[sqlalchemy.Engine]
) -> None:
    from corral._plugin._sandbox import SandboxManager

    db, eng = sandbox(pool, mode="sandbox"), sandbox(engines[0], mode="sandbox")
    for _ in range(2):  # a session scope's level and a module scope's, both shared
        db.create_sandbox()
        eng.create_sandbox()
    eng.create_sandbox()  # and a level of the engine's alone
    box = box_of(db)
    with SandboxManager(None).unsandboxed():
        assert box.closed
        assert db.mode == eng.mode == "normal"
    assert box_of(db) is None
    assert box_of(eng) is None
    assert db.mode == eng.mode == "sandbox"
