"""One async test-side API over every sandbox adapter, so the behaviour spec is written once.

An adapter wraps one driver's handle with ``corral.sandbox.sandbox`` and offers the few
operations the spec needs. Sync adapters run their blocking calls directly (same thread,
same context: exactly how a sync app behaves); their concurrency runs in threads.
Issue 6 adds SQLAlchemy and asyncpg adapters here.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import inspect
import itertools
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ClassVar

import asyncpg
import psycopg
import psycopg_pool
import pytest
import sqlalchemy
from psycopg.pq import TransactionStatus
from sqlalchemy.ext.asyncio import create_async_engine

from corral.sandbox import sandbox

_STATUS = {
    TransactionStatus.IDLE: "idle",
    TransactionStatus.INTRANS: "intrans",
    TransactionStatus.INERROR: "inerror",
    TransactionStatus.ACTIVE: "active",
    TransactionStatus.UNKNOWN: "unknown",
}


class Conn(abc.ABC):
    """One application connection (a checkout), driver-neutral and awaitable."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Any = None) -> None: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]: ...

    async def fetchval(self, sql: str, params: Any = None) -> Any:
        rows = await self.fetch(sql, params)
        return rows[0][0] if rows else None

    @abc.abstractmethod
    async def commit(self) -> None: ...

    @abc.abstractmethod
    async def rollback(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> Any:
        """An async context manager: the driver's transaction block."""

    @abc.abstractmethod
    async def set_autocommit(self, value: bool) -> None: ...

    @property
    @abc.abstractmethod
    def status(self) -> str:
        """``idle`` / ``intrans`` / ``inerror``, as the app sees it."""

    @property
    @abc.abstractmethod
    def raw(self) -> Any:
        """The object the app holds (to test driver-specific API)."""


class Adapter(abc.ABC):
    name: ClassVar[str]
    is_async: ClassVar[bool]
    #: whether one connection can serve another thread's event loop (asyncpg's cannot)
    cross_loop: ClassVar[bool] = True
    #: whether a multi-statement script runs in one call (in production too)
    scripts: ClassVar[bool] = True
    #: what the app catches for a database error (the driver's base class, or SQLAlchemy's)
    db_error: ClassVar[type[BaseException] | tuple[type[BaseException], ...]] = psycopg.Error
    #: what the app sees when the connection dies under it
    disconnect_error: ClassVar[type[BaseException] | tuple[type[BaseException], ...]] = (
        psycopg.OperationalError
    )

    def __init__(self, dsn: str, **options: Any) -> None:
        self.dsn = dsn
        self.options = options

    db: Any

    @abc.abstractmethod
    async def open(self, max_size: int = 4) -> None: ...

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    @abc.abstractmethod
    async def create(self, **kwargs: Any) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def restore(self) -> None: ...

    @abc.abstractmethod
    def connection(self) -> Any:
        """``async with ad.connection() as conn``: one app unit of work (commits on exit)."""

    async def fetchval(self, sql: str, params: Any = None) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(sql, params)

    async def execute(self, sql: str, params: Any = None) -> None:
        async with self.connection() as conn:
            await conn.execute(sql, params)

    @abc.abstractmethod
    async def concurrently(self, n: int, worker: Callable[[int], Awaitable[Any]]) -> list[Any]:
        """Run *n* workers at once: threads for sync adapters, gathered tasks for async."""

    def original(self, exc: BaseException) -> BaseException:
        """The driver's exception inside what the app caught (SQLAlchemy wraps it)."""
        return exc

    def track(self) -> None:
        """Remember the sandbox just opened (see :meth:`close_leaked`)."""
        box = self.db._router.owned()
        opened: list[Any] = self.__dict__.setdefault("_opened", [])
        if box is not None and all(b is not box for b in opened):
            opened.append(box)

    async def close_leaked(self) -> None:
        """Roll back sandboxes a failed test left open: the fixture's teardown runs in
        another context and cannot see them, and their locks would fail later tests."""
        for box in self.__dict__.pop("_opened", []):
            if not box.closed:
                result = box.close()
                if inspect.isawaitable(result):
                    await result

    def sqlstate(self, exc: BaseException) -> str | None:
        found: str | None = getattr(self.original(exc), "sqlstate", None)
        return found

    @contextmanager
    def raises(self, sqlstate: str) -> Iterator[pytest.ExceptionInfo[BaseException]]:
        """Like ``pytest.raises`` for the database error with SQLSTATE *sqlstate*."""
        with pytest.raises(self.db_error) as info:
            yield info
        assert self.sqlstate(info.value) == sqlstate, repr(info.value)

    @abc.abstractmethod
    async def getconn(self) -> Any:
        """Check a connection out the driver's way, and keep it (see :meth:`putconn`)."""

    @abc.abstractmethod
    async def putconn(self, raw: Any) -> None: ...

    @abc.abstractmethod
    async def raw_execute(self, raw: Any, sql: str) -> Any:
        """Run *sql* on what :meth:`getconn` returned."""

    def event(self) -> Event:
        """An event the workers of :meth:`concurrently` can share."""
        return Event(threaded=not self.is_async)


class SyncAdapter(Adapter):
    """A sync driver's adapter: sandbox operations called directly, workers in threads."""

    is_async = False

    async def create(self, **kwargs: Any) -> None:
        self.db.create_sandbox(**kwargs)
        self.track()

    async def close(self) -> None:
        self.db.close_sandbox()

    async def restore(self) -> None:
        self.db.restore_sandbox()

    async def concurrently(self, n: int, worker: Callable[[int], Awaitable[Any]]) -> list[Any]:
        def run(i: int) -> Any:
            return asyncio.run(worker(i))  # type: ignore[arg-type]

        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            return list(ex.map(run, range(n)))


class AsyncAdapter(Adapter):
    """An async driver's adapter: sandbox operations awaited, workers as gathered tasks."""

    is_async = True

    async def create(self, **kwargs: Any) -> None:
        await self.db.create_sandbox(**kwargs)
        self.track()

    async def close(self) -> None:
        await self.db.close_sandbox()

    async def restore(self) -> None:
        await self.db.restore_sandbox()

    async def concurrently(self, n: int, worker: Callable[[int], Awaitable[Any]]) -> list[Any]:
        return list(await asyncio.gather(*(worker(i) for i in range(n))))


class Event:
    """``set()`` / ``await wait()`` across threads (sync adapters) or tasks (async ones)."""

    def __init__(self, *, threaded: bool) -> None:
        self._thread_event = threading.Event() if threaded else None
        self._task_event = None if threaded else asyncio.Event()

    def set(self) -> None:
        if self._thread_event is not None:
            self._thread_event.set()
        else:
            assert self._task_event is not None
            self._task_event.set()

    async def wait(self, timeout: float = 30) -> None:
        if self._thread_event is not None:
            if not self._thread_event.wait(timeout):
                raise TimeoutError("event not set")
        else:
            assert self._task_event is not None
            await asyncio.wait_for(self._task_event.wait(), timeout)


# --------------------------------------------------------------------------- psycopg sync


class _PsycopgConn(Conn):
    """What the sync and async psycopg connections share: the status psycopg reports."""

    def __init__(self, conn: Any) -> None:
        self._c = conn

    @property
    def status(self) -> str:
        return _STATUS[self._c.info.transaction_status]

    @property
    def raw(self) -> Any:
        return self._c


class PsycopgSyncConn(_PsycopgConn):
    async def execute(self, sql: str, params: Any = None) -> None:
        self._c.execute(sql, params)

    async def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._c.execute(sql, params).fetchall()
        return rows

    async def commit(self) -> None:
        self._c.commit()

    async def rollback(self) -> None:
        self._c.rollback()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        with self._c.transaction() as tx:
            yield tx

    async def set_autocommit(self, value: bool) -> None:
        self._c.autocommit = value


class PsycopgSync(SyncAdapter):
    name = "psycopg-sync"

    async def open(self, max_size: int = 4) -> None:
        self.pool = psycopg_pool.ConnectionPool(
            self.dsn, min_size=1, max_size=max_size, open=True, name=self.name
        )
        self.db = sandbox(self.pool, mode="sandbox", **self.options)

    async def aclose(self) -> None:
        await self.close_leaked()
        self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        with self.db.connection() as conn:
            yield PsycopgSyncConn(conn)

    async def getconn(self) -> Any:
        return self.db.getconn()

    async def putconn(self, raw: Any) -> None:
        self.db.putconn(raw)

    async def raw_execute(self, raw: Any, sql: str) -> Any:
        return raw.execute(sql)


# --------------------------------------------------------------------------- psycopg async


class PsycopgAsyncConn(_PsycopgConn):
    async def execute(self, sql: str, params: Any = None) -> None:
        await self._c.execute(sql, params)

    async def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        cur = await self._c.execute(sql, params)
        rows: list[tuple[Any, ...]] = await cur.fetchall()
        return rows

    async def commit(self) -> None:
        await self._c.commit()

    async def rollback(self) -> None:
        await self._c.rollback()

    def transaction(self) -> Any:
        return self._c.transaction()

    async def set_autocommit(self, value: bool) -> None:
        await self._c.set_autocommit(value)


class PsycopgAsync(AsyncAdapter):
    name = "psycopg-async"

    async def open(self, max_size: int = 4) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            self.dsn, min_size=1, max_size=max_size, open=False, name=self.name
        )
        await self.pool.open()
        self.db = sandbox(self.pool, mode="sandbox", **self.options)

    async def aclose(self) -> None:
        await self.close_leaked()
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self.db.connection() as conn:
            yield PsycopgAsyncConn(conn)

    async def getconn(self) -> Any:
        return await self.db.getconn()

    async def putconn(self, raw: Any) -> None:
        await self.db.putconn(raw)

    async def raw_execute(self, raw: Any, sql: str) -> Any:
        return await raw.execute(sql)


# --------------------------------------------------------------------------- asyncpg


def asyncpg_params(dsn: str) -> dict[str, Any]:
    """asyncpg's connect() arguments for a libpq conninfo string."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    names = {"host": "host", "port": "port", "user": "user", "password": "password"}
    params: dict[str, Any] = {k: info[v] for k, v in names.items() if info.get(v)}
    params["database"] = info.get("dbname")
    if "port" in params:
        params["port"] = int(params["port"])
    return params


def dollar(sql: str) -> str:
    """The spec's ``%s`` placeholders in asyncpg's ``$n`` style."""
    n = itertools.count(1)
    return re.sub(r"%s", lambda _: f"${next(n)}", sql)


class AsyncpgConn(Conn):
    """An asyncpg connection driven the way SQLAlchemy drives it: unless autocommit, the
    first statement opens ``conn.transaction()``, and commit()/rollback() end it."""

    def __init__(self, conn: Any) -> None:
        self._c = conn
        self._tx: Any = None
        self._autocommit = False
        self._failed = False

    async def _begin(self) -> None:
        if not self._autocommit and self._tx is None and not self._c.is_in_transaction():
            tx = self._c.transaction()
            await tx.start()
            self._tx = tx
            self._failed = False

    async def _call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        await self._begin()
        try:
            return await fn()
        except Exception:
            self._failed = self._c.is_in_transaction()
            raise

    async def execute(self, sql: str, params: Any = None) -> None:
        await self._call(lambda: self._c.execute(dollar(sql), *(params or ())))

    async def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        rows = await self._call(lambda: self._c.fetch(dollar(sql), *(params or ())))
        return [tuple(r) for r in rows]

    async def commit(self) -> None:
        tx, self._tx = self._tx, None
        self._failed = False
        if tx is not None:
            await tx.commit()

    async def rollback(self) -> None:
        tx, self._tx = self._tx, None
        self._failed = False
        if tx is not None:
            await tx.rollback()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self._c.transaction() as tx:
            yield tx

    async def set_autocommit(self, value: bool) -> None:
        assert self._tx is None
        self._autocommit = value

    @property
    def status(self) -> str:
        if not self._c.is_in_transaction():
            return "idle"
        return "inerror" if self._failed else "intrans"

    @property
    def raw(self) -> Any:
        return self._c


class Asyncpg(AsyncAdapter):
    name = "asyncpg"
    cross_loop = False
    db_error = asyncpg.PostgresError
    disconnect_error = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)

    async def open(self, max_size: int = 4) -> None:
        self.pool = await asyncpg.create_pool(
            min_size=1, max_size=max_size, **asyncpg_params(self.dsn)
        )
        self.db = sandbox(self.pool, mode="sandbox", **self.options)

    async def aclose(self) -> None:
        await self.close_leaked()
        await self.db.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self.db.acquire() as raw:
            conn = AsyncpgConn(raw)
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            await conn.commit()

    async def getconn(self) -> Any:
        return await self.db.acquire()

    async def putconn(self, raw: Any) -> None:
        await self.db.release(raw)

    async def raw_execute(self, raw: Any, sql: str) -> Any:
        return await raw.execute(sql)


# --------------------------------------------------------------------------- SQLAlchemy


def sqlalchemy_url(dsn: str, driver: str) -> sqlalchemy.engine.URL:
    """A SQLAlchemy URL for a libpq conninfo string."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    return sqlalchemy.engine.URL.create(
        f"postgresql+{driver}",
        username=str(info.get("user") or "") or None,
        password=str(info.get("password") or "") or None,
        host=None if host.startswith("/") else host or None,
        port=int(str(info["port"])) if info.get("port") else None,
        database=str(info.get("dbname") or "") or None,
        query={"host": host} if host.startswith("/") else {},
    )


class SQLAlchemyError:
    """Error handling shared by the SQLAlchemy adapters: the app catches SQLAlchemy's
    wrapper; the driver's exception is inside it (for asyncpg, behind the dialect's own)."""

    db_error: ClassVar[type[BaseException] | tuple[type[BaseException], ...]] = (
        sqlalchemy.exc.DBAPIError
    )
    disconnect_error: ClassVar[type[BaseException] | tuple[type[BaseException], ...]] = (
        sqlalchemy.exc.DBAPIError
    )

    def original(self, exc: BaseException) -> BaseException:
        seen: BaseException | None = exc
        while seen is not None and type(seen).__module__.startswith("sqlalchemy."):
            nxt = getattr(seen, "orig", None)
            seen = nxt if isinstance(nxt, BaseException) else seen.__cause__
        return seen if seen is not None else exc


class SAConn(Conn):
    """A SQLAlchemy ``Connection`` (sync or async) driven as an app drives it."""

    def __init__(self, conn: Any, is_async: bool) -> None:
        self._c = conn
        self._async = is_async
        self._failed = False

    def _sync(self) -> Any:
        return self._c.sync_connection if self._async else self._c

    async def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
            return await result if self._async else result
        except Exception:
            self._failed = True
            raise

    def _sql(self, sql: str) -> str:
        driver = self._sync().dialect.driver
        return dollar(sql) if driver == "asyncpg" else sql

    async def execute(self, sql: str, params: Any = None) -> None:
        if params is None:
            await self._call(lambda: self._c.exec_driver_sql(self._sql(sql)))
        else:
            await self._call(lambda: self._c.exec_driver_sql(self._sql(sql), tuple(params)))

    async def fetch(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        if params is None:
            result = await self._call(lambda: self._c.exec_driver_sql(self._sql(sql)))
        else:
            result = await self._call(
                lambda: self._c.exec_driver_sql(self._sql(sql), tuple(params))
            )
        return [tuple(r) for r in result.fetchall()]

    async def commit(self) -> None:
        self._failed = False
        await self._call(self._c.commit)

    async def rollback(self) -> None:
        self._failed = False
        await self._call(self._c.rollback)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        tx = self._c.begin_nested() if self._c.in_transaction() else self._c.begin()
        if self._async:
            async with tx as t:
                yield t
        else:
            with tx as t:
                yield t

    async def set_autocommit(self, value: bool) -> None:
        level = "AUTOCOMMIT" if value else "READ COMMITTED"
        result = self._c.execution_options(isolation_level=level)
        if self._async:
            await result

    @property
    def driver(self) -> Any:
        """The driver-level connection under SQLAlchemy (corral's virtual connection)."""
        dbapi = self._sync().connection.dbapi_connection
        return getattr(dbapi, "driver_connection", dbapi)

    @property
    def status(self) -> str:
        driver = self.driver
        if hasattr(driver, "info"):
            return _STATUS[driver.info.transaction_status]
        if not driver.is_in_transaction():
            return "idle"
        return "inerror" if self._failed else "intrans"

    @property
    def raw(self) -> Any:
        return self._c


class SQLAlchemySync(SQLAlchemyError, SyncAdapter):
    name = "sqlalchemy_psycopg"

    async def open(self, max_size: int = 4) -> None:
        self.engine = sqlalchemy.create_engine(
            sqlalchemy_url(self.dsn, "psycopg"), pool_size=max_size, max_overflow=0
        )
        self.db = sandbox(self.engine, mode="sandbox", **self.options)

    async def aclose(self) -> None:
        await self.close_leaked()
        self.db.close()
        self.engine.dispose()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        with self.engine.connect() as raw:
            conn = SAConn(raw, is_async=False)
            try:
                yield conn
            except BaseException:
                raw.rollback()
                raise
            raw.commit()

    async def getconn(self) -> Any:
        return self.engine.connect()

    async def putconn(self, raw: Any) -> None:
        raw.close()

    async def raw_execute(self, raw: Any, sql: str) -> Any:
        return raw.exec_driver_sql(sql)


class SQLAlchemyAsync(SQLAlchemyError, AsyncAdapter):
    name = "sqlalchemy_psycopg_async"
    driver = "psycopg"
    cross_loop = False

    async def open(self, max_size: int = 4) -> None:
        self.engine = create_async_engine(
            sqlalchemy_url(self.dsn, self.driver), pool_size=max_size, max_overflow=0
        )
        self.db = sandbox(self.engine, mode="sandbox", **self.options)

    async def aclose(self) -> None:
        await self.close_leaked()
        await self.db.close()
        await self.engine.dispose()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self.engine.connect() as raw:
            conn = SAConn(raw, is_async=True)
            try:
                yield conn
            except BaseException:
                await raw.rollback()
                raise
            await raw.commit()

    async def getconn(self) -> Any:
        return await self.engine.connect()

    async def putconn(self, raw: Any) -> None:
        await raw.close()

    async def raw_execute(self, raw: Any, sql: str) -> Any:
        return await raw.exec_driver_sql(sql)


class SQLAlchemyAsyncpg(SQLAlchemyAsync):
    name = "sqlalchemy_asyncpg"
    driver = "asyncpg"
    scripts = False


ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a
    for a in (
        PsycopgSync,
        PsycopgAsync,
        Asyncpg,
        SQLAlchemySync,
        SQLAlchemyAsync,
        SQLAlchemyAsyncpg,
    )
}


def connect_outside(dsn: str) -> psycopg.Connection[Any]:
    """An independent autocommit connection: sees only what is really committed."""
    return psycopg.Connection.connect(dsn, autocommit=True)
