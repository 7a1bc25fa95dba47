"""The psycopg 3 asyncio proxies the application holds in a sandbox: connection, cursor,
transaction block. A thin shell over :mod:`._psycopg_proxy`: the round trips only (the
blocking twin, :mod:`._psycopg_sync_conn`, is generated from this module).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from corral._twins import ASYNC
from corral.sandbox._locks import AsyncOwnerLock, reads
from corral.sandbox._plan import Kind, Statement, Step
from corral.sandbox._psycopg_common import translate
from corral.sandbox._psycopg_proxy import (
    ConnectionBase,
    CursorBase,
    PsycopgBox,
    Send,
    TransactionBase,
)

__all__ = ["AsyncSandboxConnection", "AsyncSandboxCursor", "AsyncSandboxTransaction"]

logger = logging.getLogger("corral.sandbox.psycopg")


class Box(PsycopgBox, Protocol):
    """What these proxies need of their box (:mod:`._psycopg_async`'s, which imports this
    module): said here, so this module needs nothing from there."""

    @property
    def lock(self) -> AsyncOwnerLock: ...
    def note(self, exc: BaseException) -> None: ...
    async def run(
        self,
        step: Step | None,
        cursor: psycopg.AsyncCursor[Any] | None = None,
    ) -> None: ...
    async def send(self, sql: str | None) -> None: ...


class AsyncSandboxConnection(ConnectionBase[Box]):
    """The application's view of a sandbox connection: a psycopg ``AsyncConnection`` look-alike.

    Transaction control (``commit``, ``rollback``, ``transaction()``, ``autocommit``,
    SQL ``BEGIN``/``COMMIT``/...) becomes savepoints; everything else is psycopg's own
    connection (``__getattr__`` forwards).
    """

    # ------------------------------------------------------------------ settings
    # ``conn.autocommit`` and the other settings are ConnectionBase's attributes (assigned
    # on the blocking proxy only, as in psycopg); here, psycopg's ``set_<name>()`` methods.

    if ASYNC:
        _is_async = True

    async def set_autocommit(self, value: bool) -> None:
        self._set_autocommit(value)

    async def set_read_only(self, value: bool | None) -> None:
        self._set_read_only(value)

    async def set_isolation_level(self, value: Any) -> None:
        self._set_isolation_level(value)

    async def set_deferrable(self, value: bool | None) -> None:
        self._set_deferrable(value)

    # ------------------------------------------------------------------ statements

    def cursor(self, *args: Any, **kwargs: Any) -> AsyncSandboxCursor:
        return AsyncSandboxCursor(self, self._real_cursor(args, kwargs))

    async def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> AsyncSandboxCursor:
        return await self.cursor().execute(query, params, prepare=prepare, binary=binary or None)

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator[_NoPipeline]:
        # Pipelined errors surface late, after the plan must have reacted; in a sandbox
        # statements run one by one instead (same results, no batching).
        self._usable()
        yield _NoPipeline()

    async def _run(
        self,
        query: Any,
        script: bool,
        run: Callable[[], Awaitable[Any]],
        cur: psycopg.AsyncCursor[Any],
    ) -> None:
        """Run one app statement (or script) through the plan."""
        for st, text, piece in self._pieces(query, script, run, cur):
            if st is None or st.kind is Kind.OTHER:
                async with self._statement(st, text):
                    await piece()
            else:
                await self._control(st, piece, cur)

    @asynccontextmanager
    async def _statement(self, st: Statement | None, text: str | None) -> AsyncIterator[None]:
        box = self._box
        async with box.lock.turn(self._app, self._timeout, write=not reads(st)):
            await box.run(box.plan.before_statement(self._app))
            try:
                yield
            except psycopg.Error as exc:
                box.note(exc)
                await box.send(self._failure_sql())
                new = translate(exc, text, box.plan.lock_timeout)
                if new is exc:
                    raise
                raise new from exc
            except BaseException:
                if box.real_status() == TransactionStatus.INERROR:
                    await box.send(self._failure_sql())
                else:
                    await box.run(self._success_step(st))
                raise
            await box.run(self._success_step(st))

    async def _control(
        self,
        st: Statement,
        run: Callable[[], Awaitable[Any]],
        cur: psycopg.AsyncCursor[Any],
    ) -> None:
        box = self._box
        async with box.lock.turn(self._app, self._timeout, write=False):
            for op in self._control_flow(st):
                if isinstance(op, Send):
                    await box.run(op.step, cur if op.on_cursor else None)
                    continue
                try:
                    await run()
                except psycopg.Error as exc:
                    box.note(exc)
                    raise

    # ------------------------------------------------------------------ transactions

    async def _end(self, *, commit: bool, cur: psycopg.AsyncCursor[Any] | None = None) -> None:
        async with self._box.lock.turn(self._app, self._timeout, write=False):
            await self._box.run(self._end_step(commit=commit), cur)

    async def commit(self) -> None:
        self._check_commit()
        await self._end(commit=True)

    async def rollback(self) -> None:
        if self._check_rollback():
            await self._end(commit=False)

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncSandboxTransaction:
        self._usable()
        return AsyncSandboxTransaction(self, savepoint_name, force_rollback)

    async def close(self) -> None:
        if self._closed:
            return
        if self._open_work():
            await self._end(commit=False)  # closing a connection discards its transaction
        self._closed_now()

    async def __aenter__(self) -> AsyncSandboxConnection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.closed:
            if not self._pooled:
                self._checkin()
            return
        if et is None:
            await self.commit()
        else:
            try:
                await self.rollback()
            except Exception as exc:
                logger.warning("error ignored in rollback on %s: %s", self, exc)
        if not self._pooled:
            await self.close()


class _NoPipeline:
    async def sync(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<sandbox pipeline (statements run one by one)>"


class AsyncSandboxTransaction(TransactionBase[AsyncSandboxConnection]):
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    async def __aenter__(self) -> AsyncSandboxTransaction:
        conn = self._conn
        async with conn._box.lock.turn(conn._app, conn._timeout, write=False):
            await conn._box.run(self._enter_step())
        self._conn._blocks += 1
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        leaving = self._leaving(et, e)
        if leaving is None:
            return False
        swallow, commit = leaving
        try:
            conn = self._conn
            async with conn._box.lock.turn(conn._app, conn._timeout, write=False):
                await conn._box.run(self._exit_step(commit=commit))
        except Exception:
            # As psycopg: a failed commit raises; a failed rollback is logged, and the
            # block's own exception (a Rollback too) goes on.
            if commit:
                raise
            logger.warning("error ignored in rollback of a transaction block", exc_info=True)
            return False
        return swallow


class AsyncSandboxCursor(CursorBase[AsyncSandboxConnection, "psycopg.AsyncCursor[Any]"]):
    """A psycopg async cursor whose statements go through the sandbox's plan."""

    async def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> AsyncSandboxCursor:
        real, options = self._real, self._options(prepare, binary)
        await self._conn._run(
            query,
            not params,
            lambda: real.execute(query, params, **options),
            real,
        )
        return self

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        real = self._real
        await self._conn._run(
            query, False, lambda: real.executemany(query, params_seq, returning=returning), real
        )

    if ASYNC:

        async def stream(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
            text = self._text(query)
            async with self._conn._statement(None, text):
                async for row in self._real.stream(query, params, **kwargs):
                    yield row

    else:

        def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
            # `yield from`, not a loop: closing the generator closes psycopg's first.
            text = self._text(query)
            with self._conn._statement(None, text):
                yield from self._real.stream(query, params, **kwargs)

    @asynccontextmanager
    async def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        text = self._text(statement)
        async with (
            self._conn._statement(None, text),
            self._real.copy(statement, params, **kwargs) as cp,
        ):
            yield cp

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._real.__aiter__()

    async def __aenter__(self) -> AsyncSandboxCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._real.close()
