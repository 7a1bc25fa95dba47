"""The asyncpg adapter: ``sandbox(pool)`` for an ``asyncpg.Pool``.

In sandbox mode ``acquire()`` hands out :class:`AsyncpgSandboxConnection` proxies of the
sandbox's one connection, and ``release()`` takes them back without asyncpg's reset
(RESET ALL / UNLISTEN / CLOSE ALL would undo the sandbox's own settings mid-test).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Generator
from types import TracebackType
from typing import Any

import asyncpg
from asyncpg import exceptions as pgexc

from corral.sandbox._asyncpg_conn import AsyncpgSandboxConnection
from corral.sandbox._boxes import AsyncBoxController
from corral.sandbox._controller import BoxBase
from corral.sandbox._locks import AsyncOwnerLock
from corral.sandbox._messages import LOST_NOTE
from corral.sandbox._plan import Step
from corral.sandbox._targets import Target, asyncpg_socket, target

__all__ = ["AsyncpgPoolSandbox", "AsyncpgSandboxBase"]

logger = logging.getLogger("corral.sandbox.asyncpg")

#: Prepared statements kept per connection (asyncpg's own statement cache default).
_STATEMENTS = 100
#: Errors that mean the connection itself is gone.
_DEAD = (pgexc.PostgresConnectionError, pgexc.InterfaceError, ConnectionError, OSError)


def _closed(conn: Any) -> bool:
    """Whether *conn* is closed; a pool proxy whose connection died says so by raising."""
    try:
        return bool(conn.is_closed())
    except pgexc.InterfaceError:
        return True


def _unwrapped(checkout: Any) -> Any:
    """The driver connection behind a pool checkout (asyncpg's ``PoolConnectionProxy``).

    The proxy only forwards each call to the connection it wraps, and while corral
    holds the checkout that forwarding is all it does; it costs a tenth of an empty
    sandbox. asyncpg has no public name for the wrapped connection: without ``_con``
    (another asyncpg), the checkout itself serves.
    """
    conn = getattr(checkout, "_con", None)
    return conn if isinstance(conn, asyncpg.Connection) else checkout


class _Real:
    """A connection the controller keeps between sandboxes, with its prepared statements.

    :ivar conn: the driver's connection, which every statement goes to.
    :ivar checkout: what goes back to the pool (the pool's proxy of *conn*), if any.

    ``generation`` changes whenever the schema the statements were prepared against may
    have changed (DDL in the sandbox, or the rollback of a sandbox that ran DDL).
    """

    def __init__(self, conn: Any, checkout: Any = None) -> None:
        self.conn = conn
        self.checkout = checkout
        self.statements: OrderedDict[tuple[str, tuple[tuple[str, Any], ...]], Any] = OrderedDict()
        self.generation = 0


class _Box(BoxBase):
    """One open sandbox on an asyncpg connection."""

    def __init__(self, controller: AsyncpgSandboxBase, real: _Real) -> None:
        super().__init__(controller._new_plan())
        self.controller = controller
        self.holder = real
        self.real = real.conn
        self.lock = AsyncOwnerLock()
        #: the real transaction is failed until a ROLLBACK (TO) (asyncpg does not say)
        self.inerror = False
        self.schema_changed = False
        self._isolation: str | None = None

    @property
    def generation(self) -> int:
        return self.holder.generation

    async def open(self) -> None:
        real = self.real
        if real.is_in_transaction():
            await real.execute("ROLLBACK")
        step = self.plan.open()
        await real.execute(step.sql)
        if step.ask:
            self.plan.opened(bool(await real.fetchval(step.ask)))

    # ------------------------------------------------------------------ sending

    def note(self, exc: BaseException) -> None:
        if self.broken is None and (_closed(self.real) or isinstance(exc, _DEAD)):
            if isinstance(exc, pgexc.InterfaceError) and not _closed(self.real):
                return  # misuse (e.g. a bad argument), not a dead connection
            self.broken = exc
            exc.add_note(LOST_NOTE)

    async def run(self, step: Step | None) -> None:
        if step is None:
            return
        self.check()
        try:
            await self.real.execute(step.sql)
        except Exception as exc:
            self.note(exc)
            if step.undo and self.broken is None:
                try:
                    await self.real.execute(step.undo)
                    self.inerror = False
                except Exception as again:
                    self.note(again)
            raise
        if step.rolls_back:
            self.inerror = False

    async def isolation(self) -> str:
        """The outer transaction's isolation level, as ``SHOW transaction_isolation`` says."""
        if self._isolation is None:
            self._isolation = str(await self.real.fetchval("SHOW transaction_isolation"))
        return self._isolation

    async def reload_schema(self) -> None:
        """Forget prepared statements and type information: the schema changed."""
        self.schema_changed = True
        self.holder.generation += 1
        self.holder.statements.clear()
        await self.real.reload_schema_state()

    async def prepare(self, query: str, **options: Any) -> Any:
        """A real prepared statement for *query*, from this connection's cache."""
        options.pop("name", None)  # names are for the server; the cache keeps its own
        key = (query, tuple(sorted(options.items())))
        cache = self.holder.statements
        stmt = cache.get(key)
        if stmt is not None:
            cache.move_to_end(key)
            return stmt
        self.check()
        try:
            stmt = await self.real.prepare(query, **options)
        except Exception as exc:
            self.note(exc)
            raise
        cache[key] = stmt
        if len(cache) > _STATEMENTS:
            cache.popitem(last=False)
        return stmt

    # ------------------------------------------------------------------ closing

    async def abort(self) -> None:
        """Kill the connection (a checkout never came back; the sandbox closes anyway)."""
        if not _closed(self.real):
            self.real.terminate()

    async def rolled_back(self) -> None:
        """After a ROLLBACK TO of a sandbox level: not failed, and DDL undone."""
        self.inerror = False
        if self.schema_changed:
            await self.reload_schema()

    async def close(self) -> None:
        if not self._start_closing():
            return
        real = self.real
        rolled_back = False
        if self.broken is None and not _closed(real):
            try:
                # With session advisory locks freed if the sandbox's SQL named any.
                await real.execute(self.plan.close())
                if self.schema_changed:
                    await self.reload_schema()  # the rollback undid the DDL
                rolled_back = True
            except Exception as exc:
                logger.warning("rolling back a sandbox failed; discarding its connection: %s", exc)
                if not _closed(real):
                    real.terminate()
        self.lock.force_release()
        await self.controller._give(self.holder, rolled_back=rolled_back)


class AsyncpgSandboxBase(AsyncBoxController[_Box]):
    """Sandbox operations over asyncpg connections, wherever they come from."""

    _dead_errors = _DEAD
    _connection_kind = "asyncpg"

    def _new_box(self, real: _Real) -> _Box:
        return _Box(self, real)

    async def _give(self, real: _Real, *, rolled_back: bool = False) -> None:
        """Take *real* back after a sandbox. *rolled_back*: that sandbox's ROLLBACK just
        succeeded on it, so it is known to be open (no need to ask)."""
        raise NotImplementedError

    async def _discard(self, real: _Real) -> None:
        if not _closed(real.conn):
            real.conn.terminate()

    def _new_proxy(self, box: _Box, *, pooled: bool = True) -> AsyncpgSandboxConnection:  # type: ignore[override]
        return AsyncpgSandboxConnection(box, pooled=pooled)

    async def _checkin(self, conn: AsyncpgSandboxConnection) -> None:
        if conn._open_work():
            logger.warning("rolling back returned connection: %s", conn)
            await conn._end(commit=False)
        conn._top = None
        conn._checkin()


class AsyncpgPoolSandbox(AsyncpgSandboxBase):
    """A sandboxed ``asyncpg.Pool``; use it exactly like the pool.

    :param pool: the application's pool (``asyncpg.create_pool(...)``).
    :param max_idle: connections kept acquired between sandboxes, so the next sandbox
        skips the pool's reset round trip; all go back to the pool at :meth:`close`, and
        at the first call in normal mode (a ``no_sandbox`` test may need the whole pool).
    :param options: ``mode``, ``lock_timeout``, ``checkout_timeout``,
        ``isolation_level``, ``check_deferred``: see :class:`corral.sandbox.PoolSandbox`.

    A pool that reaches the pytest plugin's throwaway server over TCP (asyncpg keeps the
    host of the URL the plugin hands out, not the socket directory in its query) connects
    through the server's Unix socket from its first sandbox on: same database, user and
    settings, a cheaper round trip (``docs/adopting.md``, "asyncpg").
    """

    def __init__(self, pool: Any, *, max_idle: int = 4, **options: Any) -> None:
        super().__init__(**options)
        self.pool = pool
        self.max_idle = max_idle
        self._idle: list[_Real] = []
        self._socket_checked = False

    def _connect_args(self) -> tuple[str | None, dict[str, Any]] | None:
        """The DSN and keyword arguments the pool connects with; None: unreadable."""
        # asyncpg keeps them only privately (a tuple, a list after set_connect_args()).
        args = getattr(self.pool, "_connect_args", None)
        kwargs = getattr(self.pool, "_connect_kwargs", None)
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            return None
        params = dict(kwargs)
        dsn = args[0] if args else params.pop("dsn", None)
        return (dsn, params) if dsn is None or isinstance(dsn, str) else None

    def _target(self) -> Target | None:
        # Unreadable connect arguments: the pool keeps a connection of its own.
        connect = self._connect_args()
        return None if connect is None else target(*connect)

    async def _use_socket(self) -> None:
        """Connect through the throwaway server's Unix socket if the pool reaches it by TCP.

        ``Pool.set_connect_args()`` (public) keeps everything else the pool does with a new
        connection (``init``, ``setup``, ``connection_class``, codecs); the connections it
        opened already are replaced as they are next acquired (``expire_connections()``).
        """
        self._socket_checked = True
        connect = self._connect_args()
        socket = None if connect is None else asyncpg_socket(*connect)
        if connect is None or socket is None:
            return
        dsn, params = connect
        directory, port = socket
        self.pool.set_connect_args(dsn, **{**params, "host": directory, "port": port})
        await self.pool.expire_connections()
        logger.debug("%r connects through the socket in %s from now on", self.pool, directory)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def __await__(self) -> Generator[Any, None, AsyncpgPoolSandbox]:
        return self._init().__await__()

    async def _init(self) -> AsyncpgPoolSandbox:
        await self.pool
        return self

    async def __aenter__(self) -> AsyncpgPoolSandbox:
        await self.pool.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._release_idle()
        await self.pool.__aexit__(et, e, tb)

    async def _take(self) -> _Real:
        if not self._socket_checked:
            await self._use_socket()
        while self._idle:
            real = self._idle.pop()
            if not _closed(real.conn):
                return real
            await self._release(real)
        checkout = await self.pool.acquire()
        return _Real(_unwrapped(checkout), checkout)

    async def _give(self, real: _Real, *, rolled_back: bool = False) -> None:
        if len(self._idle) >= self.max_idle or (not rolled_back and _closed(real.conn)):
            await self._release(real)
        else:
            self._idle.append(real)

    async def _release(self, real: _Real) -> None:
        try:
            await self.pool.release(real.checkout)
        except pgexc.InterfaceError:
            pass  # dead: the pool took it back
        except Exception as exc:
            # Its backend went away while corral kept it (a recreated database): the
            # reset failed, and asyncpg terminated it and took it back.
            logger.info("returning a kept connection to the pool: %s", exc)
            if not _closed(real.conn):
                real.conn.terminate()

    async def _release_idle(self) -> None:
        while self._idle:
            await self._release(self._idle.pop())

    def _unkeep(self) -> list[Any]:
        kept, self._idle = self._idle, []
        return kept

    async def _close_kept(self, kept: list[Any]) -> None:
        for real in kept:
            await self._release(real)

    async def _normal(self) -> Any:
        """The pool, for a call in normal mode: first the connections kept for sandboxes
        go back to it (a ``no_sandbox`` test may need every connection the pool has)."""
        if self._idle:
            await self._release_idle()
        return self.pool

    # ------------------------------------------------------------------ the Pool API

    def acquire(self, *, timeout: float | None = None) -> Any:
        """Like ``pool.acquire()``: ``async with db.acquire() as conn`` or ``await``."""
        if not self.sandboxing:
            if self._idle:
                return _AcquireAfterReturning(self, timeout)
            return self.pool.acquire(timeout=timeout)
        return _Acquire(self, timeout)

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Like ``pool.release()``; a sandbox connection's open transaction is rolled back."""
        if isinstance(connection, AsyncpgSandboxConnection):
            await self._checkin(connection)
            return
        await self.pool.release(connection, timeout=timeout)

    async def close(self) -> None:
        """Return the kept connections, then close the pool."""
        await self._release_idle()
        await self.pool.close()

    def terminate(self) -> None:
        self._idle.clear()
        self.pool.terminate()

    async def expire_connections(self) -> None:
        await self._release_idle()
        await self.pool.expire_connections()

    async def discard_idle(self) -> None:
        """Close the pool's idle connections now; checked-out ones close when released.

        asyncpg's own ``expire_connections()`` marks every connection for replacement,
        but an idle one is only closed at its next ``acquire()``: until then it holds a
        backend (and keeps a database that is to be dropped busy). So the idle ones are
        also closed here, the way asyncpg's ``max_inactive_connection_lifetime`` closes
        them; the pool connects again on demand (and back to ``min_size``).
        """
        await self.pool.expire_connections()
        while self._idle:  # corral's: closed without a goodbye to a backend maybe gone
            real = self._idle.pop()
            await self._discard(real)
            await self._release(real)
        # asyncpg has no public call for "close the idle ones now": its holders do it.
        for holder in list(getattr(self.pool, "_holders", ())):
            if holder.is_connected() and holder.is_idle():
                holder.terminate()

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if not self.sandboxing:
            return str(await (await self._normal()).execute(query, *args, timeout=timeout))
        async with self.acquire() as conn:
            return str(await conn.execute(query, *args, timeout=timeout))

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        if not self.sandboxing:
            await (await self._normal()).executemany(command, args, timeout=timeout)
            return
        async with self.acquire() as conn:
            await conn.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        if not self.sandboxing:
            return list(await (await self._normal()).fetch(query, *args, **kwargs))
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, **kwargs)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if not self.sandboxing:
            return await (await self._normal()).fetchrow(query, *args, **kwargs)
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if not self.sandboxing:
            return await (await self._normal()).fetchval(query, *args, **kwargs)
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, **kwargs)

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> list[Any]:
        if not self.sandboxing:
            return list(await (await self._normal()).fetchmany(query, args, **kwargs))
        async with self.acquire() as conn:
            return await conn.fetchmany(query, args, **kwargs)  # type: ignore[no-any-return]

    async def _copy(self, method: str, *args: Any, **kwargs: Any) -> str:
        if not self.sandboxing:
            return str(await getattr(await self._normal(), method)(*args, **kwargs))
        async with self.acquire() as conn:
            return str(await getattr(conn, method)(*args, **kwargs))

    async def copy_from_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._copy("copy_from_table", table_name, **kwargs)

    async def copy_from_query(self, query: str, *args: Any, **kwargs: Any) -> str:
        return await self._copy("copy_from_query", query, *args, **kwargs)

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._copy("copy_to_table", table_name, **kwargs)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        return await self._copy("copy_records_to_table", table_name, **kwargs)


class _AcquireAfterReturning:
    """``db.acquire()`` in normal mode while connections kept for sandboxes are out of the
    pool: they go back first, then the pool's own acquire (awaitable, or ``async with``)."""

    __slots__ = ("_conn", "_db", "_timeout")

    def __init__(self, db: AsyncpgPoolSandbox, timeout: float | None) -> None:
        self._db = db
        self._timeout = timeout
        self._conn: Any = None

    async def _acquire(self) -> Any:
        pool = await self._db._normal()
        return await pool.acquire(timeout=self._timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._acquire().__await__()

    async def __aenter__(self) -> Any:
        self._conn = await self._acquire()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        await self._db.pool.release(conn)


class _Acquire:
    """``db.acquire()`` in sandbox mode: awaitable and an async context manager."""

    __slots__ = ("_conn", "_db", "_timeout")

    def __init__(self, db: AsyncpgPoolSandbox, timeout: float | None) -> None:
        self._db = db
        self._timeout = timeout
        self._conn: AsyncpgSandboxConnection | None = None

    def __await__(self) -> Generator[Any, None, AsyncpgSandboxConnection]:
        return self._db._checkout(self._timeout).__await__()

    async def __aenter__(self) -> AsyncpgSandboxConnection:
        if self._conn is not None:
            raise pgexc.InterfaceError("a connection is already acquired")
        self._conn = await self._db._checkout(self._timeout)
        return self._conn

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        await self._db._checkin(conn)
