"""The psycopg 3 adapter, asyncio: ``AsyncConnectionPool`` and async connection factories.

In sandbox mode the app gets :class:`AsyncSandboxConnection` proxies of the sandbox's one
connection; every transaction operation goes through the :class:`~._plan.Plan`.
The blocking twin, :mod:`._psycopg_sync`, is generated from this module.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from corral._twins import ASYNC
from corral.sandbox._boxes import AsyncBoxController
from corral.sandbox._locks import AsyncOwnerLock
from corral.sandbox._plan import Step
from corral.sandbox._psycopg_async_conn import AsyncSandboxConnection
from corral.sandbox._psycopg_common import (
    PsycopgBoxBase,
    SandboxCursors,
    factory_target,
    pool_target,
)
from corral.sandbox._targets import Target

__all__ = ["AsyncConnectSandbox", "AsyncPoolSandbox"]

logger = logging.getLogger("corral.sandbox.psycopg")


class _Box(PsycopgBoxBase["psycopg.AsyncConnection[Any]"]):
    """One open sandbox on a psycopg async connection."""

    def __init__(self, controller: _Controller, real: psycopg.AsyncConnection[Any]) -> None:
        super().__init__(controller._new_plan(), real)
        self.controller = controller
        self.lock = AsyncOwnerLock()
        self._cur: psycopg.AsyncCursor[Any] | None = None

    async def open(self) -> None:
        real = self.real
        if real.pgconn.transaction_status != TransactionStatus.IDLE:
            await real.rollback()
        if not real.autocommit:
            # the plan sends BEGIN/SAVEPOINT itself
            if ASYNC:
                await real.set_autocommit(True)
            else:
                real.autocommit = True
        self._cur = self.controller._cursors.get(real)
        step = self.plan.open()
        await self._cur.execute(step.script.encode())
        if step.ask:
            while self._cur.nextset():
                pass
            row = await self._cur.fetchone()
            self.plan.opened(bool(row and row[0]))

    # ------------------------------------------------------------------ sending

    async def run(self, step: Step | None, cursor: psycopg.AsyncCursor[Any] | None = None) -> None:
        if step is None:
            return
        self.check()
        cur = cursor if cursor is not None else self._cur
        assert cur is not None
        try:
            await cur.execute(step.sql.encode())
        except psycopg.Error as exc:
            self.note(exc)
            if step.undo and self.broken is None:
                try:
                    await self._cur.execute(step.undo.encode())  # type: ignore[union-attr]
                except psycopg.Error as again:
                    self.note(again)
            raise

    async def send(self, sql: str | None) -> None:
        if sql:
            await self.run(Step(sql))

    # ------------------------------------------------------------------ closing

    async def abort(self) -> None:
        """Kill the connection (a checkout never came back; the sandbox closes anyway)."""
        await self.real.close()

    async def rolled_back(self) -> None:
        """After a ROLLBACK TO of a sandbox level: nothing to refresh for psycopg."""

    async def close(self) -> None:
        if not self._start_closing():
            return
        real = self.real
        if self.broken is None and not real.closed:
            try:
                await self._cur.execute(self.plan.close().encode())  # type: ignore[union-attr]
                if real.autocommit != self.app_autocommit:
                    if ASYNC:
                        await real.set_autocommit(self.app_autocommit)
                    else:
                        real.autocommit = self.app_autocommit
            except psycopg.Error as exc:
                logger.warning("rolling back a sandbox failed; discarding its connection: %s", exc)
                await real.close()
        self.lock.force_release()
        await self.controller._give(real)


class _Controller(AsyncBoxController[_Box]):
    """Sandbox operations common to the async pool and factory adapters."""

    _dead_errors = (psycopg.OperationalError,)
    _connection_kind = "psycopg async"
    if ASYNC:
        _loop_bound = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._cursors = SandboxCursors()

    def _new_box(self, real: psycopg.AsyncConnection[Any]) -> _Box:
        return _Box(self, real)

    async def _discard(self, real: psycopg.AsyncConnection[Any]) -> None:
        if not real.closed:
            await real.close()

    def _new_proxy(self, box: _Box, **options: Any) -> AsyncSandboxConnection:
        return AsyncSandboxConnection(box, **options)


# ---------------------------------------------------------------------------- handles


class AsyncPoolSandbox(_Controller):
    """A sandboxed ``psycopg_pool.AsyncConnectionPool``; use it exactly like the pool.

    :param pool: the application's pool.
    :param mode: ``"sandbox"`` or ``"normal"``; None reads ``CORRAL_SANDBOX_MODE``
        (default ``"normal"``).
    :param lock_timeout: seconds a statement waits for a lock held elsewhere before
        :class:`~corral.errors.SandboxLockTimeout`; None keeps the server's setting.
    :param checkout_timeout: seconds to wait for the sandbox's connection while another
        user of the same sandbox has it, before :class:`~corral.errors.SandboxBusy`.
    :param isolation_level: of each sandbox's outer transaction (default: server's).
    :param check_deferred: check deferred constraints at the app's commits; None: only
        when the database has deferrable constraints.
    :param own_connection: False (default): where another handle of the same driver on
        the same database has a sandbox open in this context, this one joins it (one
        connection, one transaction, as production's commits are seen by every handle).
        True: this handle's sandboxes always get a connection of their own.
    """

    def __init__(self, pool: Any, **options: Any) -> None:
        super().__init__(**options)
        self.pool = pool

    def _target(self) -> Target | None:
        return pool_target(self.pool)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def __aenter__(self) -> AsyncPoolSandbox:
        await self.pool.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.pool.__aexit__(*exc)

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        conn: psycopg.AsyncConnection[Any] = await self.pool.getconn()
        return conn

    async def _give(self, real: psycopg.AsyncConnection[Any]) -> None:
        await self.pool.putconn(real)

    async def discard_idle(self) -> None:
        """Close the pool's idle connections; the pool opens new ones in their place.

        ``pool.drain()`` (psycopg_pool >= 3.3): connections checked out now are left
        alone, and closed when they come back. Older psycopg_pool has no such call:
        ``pool.check()`` replaces only the idle connections that no longer work.
        """
        drain = getattr(self.pool, "drain", None)
        if drain is not None:
            await drain()
        else:
            await self.pool.check()

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """Like ``pool.connection()``: commit on success, roll back on error, return."""
        if not self.sandboxing:
            async with self.pool.connection(timeout) as conn:
                yield conn
            return
        conn = await self.getconn(timeout)
        try:
            async with conn:
                yield conn
        finally:
            await self.putconn(conn)

    async def getconn(self, timeout: float | None = None) -> Any:
        """Like ``pool.getconn()``; in sandbox mode, a proxy of the sandbox's connection."""
        if not self.sandboxing:
            return await self.pool.getconn(timeout)
        return await self._checkout(timeout)

    async def putconn(self, conn: Any) -> None:
        """Like ``pool.putconn()``; an open transaction is rolled back, as the pool does."""
        if not isinstance(conn, AsyncSandboxConnection):
            await self.pool.putconn(conn)
            return
        if conn._open_work():
            logger.warning("rolling back returned connection: %s", conn)
            await conn._end(commit=False)
        conn._checkin()


class AsyncConnectSandbox(_Controller):
    """A sandboxed async connection factory: ``await db.connect()`` replaces
    ``await psycopg.AsyncConnection.connect()``.

    :param connect: a conninfo string, or a coroutine function returning a new
        ``psycopg.AsyncConnection``.
    :param max_idle: connections kept open between sandboxes (connecting is slow).

    Other parameters as :class:`AsyncPoolSandbox`.
    """

    def __init__(
        self,
        connect: str | Callable[..., Awaitable[psycopg.AsyncConnection[Any]]],
        *,
        max_idle: int = 4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._factory = connect
        self.max_idle = max_idle
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    def _target(self) -> Target | None:
        return factory_target(self._factory)

    async def _new(self, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        if isinstance(self._factory, str):
            return await psycopg.AsyncConnection.connect(self._factory, **kwargs)
        return await self._factory(**kwargs)

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.broken:
                return conn
        return await self._new()

    async def _give(self, real: psycopg.AsyncConnection[Any]) -> None:
        if real.closed or real.broken or len(self._idle) >= self.max_idle:
            await real.close()
        else:
            self._idle.append(real)

    if ASYNC:

        def _unkeep(self) -> list[Any]:
            kept, self._idle = self._idle, []
            return kept

        async def _close_kept(self, kept: list[Any]) -> None:
            for conn in kept:
                await conn.close()

    async def connect(self, **kwargs: Any) -> Any:
        """A new connection; in sandbox mode, a proxy of the sandbox's connection.

        ``autocommit`` and ``row_factory`` are honoured in both modes; closing the proxy
        (or leaving ``async with``) hands the sandbox's connection to its next user.
        """
        if not self.sandboxing:
            return await self._new(**kwargs)
        return await self._checkout(
            None,
            autocommit=bool(kwargs.get("autocommit", False)),
            row_factory=kwargs.get("row_factory"),
            pooled=False,
        )

    async def discard_idle(self) -> None:
        """Close the connections kept for the next sandboxes (the app's own, made by
        ``connect()`` in normal mode, are the app's to close)."""
        while self._idle:
            await self._idle.pop().close()

    async def close(self) -> None:
        """Close the connections kept for the next sandboxes (as :meth:`discard_idle`)."""
        await self.discard_idle()
