"""SQLAlchemy specifics beyond the shared spec: the ORM, sessions bound to the app's own
engine, mode switches, and what is refused. The engine is never replaced: the app's
module-global ``engine`` keeps working, sandboxed in place.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy
from sqlalchemy import ForeignKey, String, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from corral.errors import SandboxError, SandboxNotActive
from corral.sandbox import sandbox
from corral.sandbox._sqlalchemy import AsyncEngineSandbox
from corral.sandbox._sqlalchemy_psycopg import EngineSandbox
from corral.sandbox._sqlalchemy_virtual import AsyncpgVirtual
from tests.sandbox._adapters import sqlalchemy_url


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    note: Mapped[str | None]


class Parent(Base):
    __tablename__ = "parent"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Child(Base):
    __tablename__ = "child"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("parent.id"))


def count_outside(outside: Any) -> int:
    n: int = outside.execute("SELECT count(*) FROM item").fetchone()[0]
    return n


@pytest.fixture
def engine(sandbox_dsn: str) -> Iterator[sqlalchemy.Engine]:
    """The app's engine, created the app's way (corral never sees its URL)."""
    eng = sqlalchemy.create_engine(sqlalchemy_url(sandbox_dsn, "psycopg"))
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine: sqlalchemy.Engine) -> Iterator[EngineSandbox]:
    controller = sandbox(engine, mode="sandbox")
    assert isinstance(controller, EngineSandbox)
    controller.create_sandbox()
    yield controller
    while controller.active:
        controller.close_sandbox()
    controller.close()
    controller.remove()


@pytest_asyncio.fixture(params=["psycopg", "asyncpg"])
async def aengine(request: pytest.FixtureRequest, sandbox_dsn: str) -> AsyncIterator[Any]:
    eng = create_async_engine(sqlalchemy_url(sandbox_dsn, request.param))
    yield eng
    await eng.dispose()


@pytest_asyncio.fixture
async def adb(aengine: Any) -> AsyncIterator[AsyncEngineSandbox]:
    controller = sandbox(aengine, mode="sandbox")
    assert isinstance(controller, AsyncEngineSandbox)
    await controller.create_sandbox()
    yield controller
    while controller._router.owned() is not None:
        await controller.close_sandbox()
    await controller.close()
    controller.remove()


# --------------------------------------------------------------------------- sync ORM


def test_session_commit_commits_only_to_the_sandbox(
    engine: sqlalchemy.Engine, db: EngineSandbox, outside: Any
) -> None:
    make = sessionmaker(bind=engine)
    with make() as session:
        session.add(Item(name="committed"))
        session.commit()
    with Session(engine) as session:  # a later session of the same test sees it
        assert session.scalars(select(Item.name)).all() == ["committed"]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO item (name) VALUES ('core')"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 2
    assert count_outside(outside) == 0
    db.close_sandbox()
    assert count_outside(outside) == 0
    db.create_sandbox()
    with Session(engine) as session:
        assert session.scalars(select(Item)).all() == []


def test_rollback_and_begin_nested_behave_as_in_production(
    engine: sqlalchemy.Engine, db: EngineSandbox
) -> None:
    with Session(engine) as session:
        session.add(Item(name="kept"))
        session.commit()
        session.add(Item(name="rolled-back"))
        session.flush()
        session.rollback()
        with session.begin():
            session.add(Item(name="outer"))
            nested = session.begin_nested()
            session.add(Item(name="inner"))
            session.flush()
            nested.rollback()
            with session.begin_nested():
                session.add(Item(name="inner-kept"))
        names = session.scalars(select(Item.name).order_by(Item.name)).all()
    assert names == ["inner-kept", "kept", "outer"]


def test_integrity_error_leaves_session_and_sandbox_usable(
    engine: sqlalchemy.Engine, db: EngineSandbox
) -> None:
    with Session(engine) as session:
        session.add(Item(name="dup"))
        session.commit()
        session.add(Item(name="dup"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()  # what the app does; then everything works again
        session.add(Item(name="after"))
        session.commit()
        assert session.scalars(select(Item.name).order_by(Item.name)).all() == ["after", "dup"]
    with Session(engine) as session:
        session.add(Child(id=1, parent_id=404))
        session.flush()  # the FK is DEFERRABLE INITIALLY DEFERRED: checked at commit
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
    with Session(engine) as session:
        assert session.scalar(select(sqlalchemy.func.count()).select_from(Child)) == 0


def test_session_joined_to_an_app_transaction_and_savepoint_mode(
    engine: sqlalchemy.Engine, db: EngineSandbox
) -> None:
    # The app's own use of SQLAlchemy's "join an external transaction" recipe still works.
    with engine.connect() as conn:
        trans = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        session.add(Item(name="joined"))
        session.commit()  # a savepoint release
        session.close()
        assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 1
        trans.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 0


def test_autocommit_engine_option_and_execution_options(sandbox_dsn: str, outside: Any) -> None:
    eng = sqlalchemy.create_engine(
        sqlalchemy_url(sandbox_dsn, "psycopg"), isolation_level="AUTOCOMMIT"
    )
    ctl: Any = sandbox(eng, mode="sandbox")
    try:
        with ctl.sandboxed():
            with eng.connect() as conn:
                conn.execute(text("INSERT INTO item (name) VALUES ('a')"))
                with pytest.raises(IntegrityError):
                    conn.execute(text("INSERT INTO item (name) VALUES ('a')"))
                # autocommit: only the failing statement was undone
                conn.execute(text("INSERT INTO item (name) VALUES ('b')"))
            with eng.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM item")).scalar() == 2
            assert count_outside(outside) == 0
    finally:
        ctl.close()
        eng.dispose()


def test_without_a_sandbox_the_engine_refuses(engine: sqlalchemy.Engine, outside: Any) -> None:
    ctl: Any = sandbox(engine, mode="sandbox")
    try:
        with pytest.raises(Exception) as info, engine.begin() as conn:
            conn.execute(text("INSERT INTO item (name) VALUES ('never')"))
        err = info.value
        assert isinstance(err, SandboxNotActive) or isinstance(
            getattr(err, "orig", None), SandboxNotActive
        )
        assert count_outside(outside) == 0
    finally:
        ctl.close()
        ctl.remove()


def test_normal_mode_leaves_the_engine_untouched(
    engine: sqlalchemy.Engine, sandbox_dsn: str, outside: Any
) -> None:
    ctl: Any = sandbox(engine, mode="normal")
    sync_engine = engine
    assert not ctl._installed
    assert not event.contains(sync_engine, "do_connect", ctl._on_do_connect)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO item (name) VALUES ('real')"))
    assert count_outside(outside) == 1
    outside.execute("DELETE FROM item")


def test_switching_modes_replaces_pooled_connections(
    engine: sqlalchemy.Engine, outside: Any
) -> None:
    ctl: Any = sandbox(engine, mode="normal")
    with engine.connect() as conn:  # a real connection now idle in the engine's pool
        conn.execute(text("SELECT 1"))
    ctl.mode = "sandbox"
    try:
        with ctl.sandboxed():
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO item (name) VALUES ('sandboxed')"))
            assert count_outside(outside) == 0
        ctl.mode = "normal"
        with engine.begin() as conn:  # the virtual connection is replaced by a real one
            conn.execute(text("INSERT INTO item (name) VALUES ('real')"))
        assert count_outside(outside) == 1
    finally:
        outside.execute("DELETE FROM item")
        ctl.close()
        ctl.remove()


def test_an_engine_with_its_own_creator_is_refused_clearly(sandbox_dsn: str, outside: Any) -> None:
    import psycopg

    eng = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(sandbox_dsn)
    )
    ctl: Any = sandbox(eng, mode="sandbox")
    try:
        with ctl.sandboxed():
            with pytest.raises(SandboxError, match="creator="), eng.begin() as conn:
                conn.execute(text("INSERT INTO item (name) VALUES ('never')"))
            assert count_outside(outside) == 0
    finally:
        ctl.close()
        ctl.remove()
        eng.dispose()


def test_one_controller_per_engine(engine: sqlalchemy.Engine) -> None:
    first: Any = sandbox(engine, mode="normal")
    with pytest.raises(SandboxError, match="already sandboxed"):
        sandbox(engine, mode="sandbox")
    first.remove()
    second: Any = sandbox(engine, mode="sandbox")
    second.remove()


def test_other_dialects_and_sessions_are_refused(engine: sqlalchemy.Engine) -> None:
    with pytest.raises(TypeError, match=r"postgresql\+psycopg"):
        sandbox(sqlalchemy.create_engine("sqlite://"), mode="sandbox")
    with pytest.raises(TypeError, match=r"sandbox\(engine\)"):
        sandbox(sessionmaker(bind=engine), mode="sandbox")
    with pytest.raises(TypeError, match="engine your sessions are bound to"):
        sandbox(Session(engine), mode="sandbox")


# --------------------------------------------------------------------------- async ORM


@pytest.mark.asyncio
async def test_async_session_commit_and_rollback(
    aengine: Any, adb: AsyncEngineSandbox, outside: Any
) -> None:
    make = async_sessionmaker(aengine, expire_on_commit=False)
    async with make() as session:
        session.add(Item(name="committed"))
        await session.commit()
        session.add(Item(name="dropped"))
        await session.flush()
        await session.rollback()
    async with AsyncSession(aengine) as session:
        names = (await session.scalars(select(Item.name))).all()
        assert names == ["committed"]
        await session.commit()
        async with session.begin():
            nested = await session.begin_nested()
            session.add(Item(name="inner"))
            await session.flush()
            await nested.rollback()
        session.add(Item(name="committed"))
        with pytest.raises(IntegrityError):
            await session.commit()
        await session.rollback()
        assert (await session.scalars(select(Item.name))).all() == ["committed"]
    assert count_outside(outside) == 0


@pytest.mark.asyncio
async def test_concurrent_async_sessions_in_one_sandbox_are_serialised(
    aengine: Any, adb: AsyncEngineSandbox
) -> None:
    async def unit(i: int) -> None:
        async with AsyncSession(aengine) as session, session.begin():
            session.add(Item(name=f"u{i}"))
            await session.flush()
            await session.execute(text("SELECT pg_sleep(0.01)"))
            await session.execute(
                text("UPDATE item SET note = :n WHERE name = :m"), {"n": f"n{i}", "m": f"u{i}"}
            )

    await asyncio.gather(*(unit(i) for i in range(4)))
    async with AsyncSession(aengine) as session:
        rows = (await session.execute(select(Item.name, Item.note).order_by(Item.name))).all()
    assert [tuple(r) for r in rows] == [(f"u{i}", f"n{i}") for i in range(4)]


@pytest.mark.asyncio
async def test_concurrent_sandboxes_on_one_async_engine_are_isolated(aengine: Any) -> None:
    ctl: Any = sandbox(aengine, mode="sandbox")

    async def test_case(i: int) -> list[str]:
        async with ctl.sandboxed(), AsyncSession(aengine) as session:
            session.add(Item(name=f"t{i}"))
            await session.commit()
            await asyncio.sleep(0.01)
            return list((await session.scalars(select(Item.name))).all())

    try:
        results = await asyncio.gather(*(test_case(i) for i in range(3)))
    finally:
        await ctl.close()
        ctl.remove()
    assert results == [["t0"], ["t1"], ["t2"]]


@pytest.mark.asyncio
async def test_ddl_in_one_sandbox_does_not_leave_stale_statements(
    aengine: Any, adb: AsyncEngineSandbox
) -> None:
    query = text("SELECT * FROM item")
    async with aengine.connect() as conn:
        await conn.execute(query)
        await conn.execute(text("ALTER TABLE item ADD COLUMN extra int"))
        assert len((await conn.execute(query)).keys()) == 4  # re-prepared after the DDL
    await adb.close_sandbox()  # the DDL is rolled back
    async with adb.sandboxed(), aengine.connect() as conn:
        assert len((await conn.execute(query)).keys()) == 3


@pytest.mark.parametrize(
    "name",
    ["execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "reload_schema_state"],
)
def test_asyncpg_virtual_methods_are_coroutine_functions_as_asyncpgs(name: str) -> None:
    # SQLAlchemy's asyncpg dialect awaits these on what its pool holds.
    asyncpg = pytest.importorskip("asyncpg")
    virtual = AsyncpgVirtual(hooks=None)  # type: ignore[arg-type]
    assert inspect.iscoroutinefunction(getattr(asyncpg.Connection, name))
    assert inspect.iscoroutinefunction(getattr(AsyncpgVirtual, name))
    assert inspect.iscoroutinefunction(getattr(virtual, name))
    assert getattr(virtual, name).__name__ == name


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_pool_pre_ping_engines(sandbox_dsn: str, driver: str, outside: Any) -> None:
    # The dialect pings before the checkout event, from inside its own coroutines.
    eng = create_async_engine(sqlalchemy_url(sandbox_dsn, driver), pool_pre_ping=True)
    ctl: Any = sandbox(eng, mode="sandbox")
    try:
        async with ctl.sandboxed():
            for i in range(3):
                async with AsyncSession(eng) as session:
                    session.add(Item(name=f"p{i}"))
                    await session.commit()
            async with AsyncSession(eng) as session:
                assert len((await session.scalars(select(Item))).all()) == 3
        assert count_outside(outside) == 0
    finally:
        await ctl.close()
        ctl.remove()
        await eng.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_null_pool_engines_keep_connecting_for_real(
    sandbox_dsn: str, driver: str, outside: Any
) -> None:
    # Every checkout of a NullPool engine connects through do_connect. On SQLAlchemy 2.0
    # its connect arguments are the engine's own dict: a virtual connection's arguments
    # written there would make each later real connection a virtual one.
    eng = create_async_engine(sqlalchemy_url(sandbox_dsn, driver), poolclass=NullPool)
    ctl: Any = sandbox(eng, mode="sandbox")
    try:
        for i in range(2):
            async with ctl.sandboxed(), AsyncSession(eng) as session:
                session.add(Item(name=f"n{i}"))
                await session.commit()
                assert len((await session.scalars(select(Item))).all()) == 1
            await ctl.discard_idle()  # the next sandbox connects afresh
        assert count_outside(outside) == 0
    finally:
        await ctl.close()
        ctl.remove()
    async with eng.connect() as conn:  # a plain engine again, connecting for real
        assert (await conn.execute(text("SELECT count(*) FROM item"))).scalar() == 0
    await eng.dispose()
