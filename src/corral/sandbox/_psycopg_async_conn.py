"""The psycopg 3 asyncio proxies the application holds in a sandbox: connection, cursor,
transaction block. Line-for-line parallel to :mod:`._psycopg_sync_conn`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.pq import TransactionStatus

from corral.errors import SandboxError
from corral.sandbox._plan import (
    AppState,
    EmulatedServerError,
    Frame,
    Kind,
    Statement,
    Step,
    quote_ident,
)
from corral.sandbox._plan import classify_script as _classify_script
from corral.sandbox._psycopg_common import app_status, emulated, query_text, refused, translate

if TYPE_CHECKING:
    from corral.sandbox._psycopg_async import _Box

__all__ = ["AsyncSandboxConnection", "AsyncSandboxCursor", "AsyncSandboxTransaction"]

logger = logging.getLogger("corral.sandbox.psycopg")


class AsyncSandboxConnection:
    """The application's view of a sandbox connection: a ``psycopg.AsyncConnection`` look-alike.

    See :class:`corral.sandbox.SandboxConnection`; the async API (``await
    conn.commit()``, ``await conn.set_autocommit()``, ``async with conn.transaction()``).
    """

    def __init__(
        self,
        box: _Box,
        *,
        autocommit: bool | None = None,
        row_factory: Any = None,
        pooled: bool = True,
    ) -> None:
        self._box = box
        self._real = box.real
        self._app = AppState(autocommit=box.app_autocommit if autocommit is None else autocommit)
        self.row_factory = row_factory if row_factory is not None else box.app_row_factory
        self._pooled = pooled
        self._closed = False
        self._blocks = 0
        self._returned = False
        self._isolation_level: Any = None
        self._deferrable: bool | None = None
        box.proxies.add(self)

    # ------------------------------------------------------------------ state

    def _detach(self) -> None:
        self._closed = True

    def _usable(self) -> None:
        if self._closed:
            if self._box.closed and not self._returned:
                raise SandboxError(
                    "this connection belonged to a sandbox that is now closed; get a new "
                    "connection inside the current sandbox"
                )
            raise psycopg.OperationalError("the connection is closed")
        self._box.check()

    @property
    def closed(self) -> bool:
        return self._closed or self._box.closed

    @property
    def broken(self) -> bool:
        return self._box.broken is not None

    @property
    def autocommit(self) -> bool:
        return self._app.autocommit

    async def set_autocommit(self, value: bool) -> None:
        self._check_settable("autocommit")
        self._app.autocommit = bool(value)

    @property
    def read_only(self) -> bool | None:
        return self._app.read_only

    async def set_read_only(self, value: bool | None) -> None:
        self._check_settable("read_only")
        self._app.read_only = value

    def _check_settable(self, attribute: str) -> None:
        self._usable()
        if self._app.frames:
            status = app_status(self._app, self._box.real_status())
            raise psycopg.ProgrammingError(
                f"can't change {attribute!r} now: connection in transaction status {status.name}"
            )

    @property
    def isolation_level(self) -> Any:
        return self._isolation_level

    async def set_isolation_level(self, value: Any) -> None:
        # Recorded, not applied: the sandbox's one outer transaction has one isolation
        # level (sandbox(..., isolation_level=...)); see docs/sandbox.md.
        self._check_settable("isolation_level")
        self._isolation_level = value

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    async def set_deferrable(self, value: bool | None) -> None:
        self._check_settable("deferrable")
        self._deferrable = value

    @property
    def info(self) -> _Info:
        return _Info(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("tpc_"):
            raise SandboxError("two-phase commit cannot run inside a sandbox")
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Own state and emulated settings stay here; anything else (prepare_threshold,
        # notify handlers...) is a setting of the real connection, as in production.
        if name.startswith("_") or name in _OWN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            setattr(self._real, name, value)

    def __repr__(self) -> str:
        return f"<AsyncSandboxConnection of {self._real!r}>"

    # ------------------------------------------------------------------ statements

    def cursor(self, *args: Any, **kwargs: Any) -> AsyncSandboxCursor:
        self._usable()
        kwargs.setdefault("row_factory", self.row_factory)
        return AsyncSandboxCursor(self, self._real.cursor(*args, **kwargs))

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
        self._usable()
        text = query_text(query, self._real)
        stmts = _classify_script(text) if text is not None else None
        if stmts is None or (len(stmts) == 1 and stmts[0].kind is Kind.OTHER):
            async with self._statement(stmts[0] if stmts else None, text):
                await run()
            return
        if len(stmts) == 1:
            await self._control(stmts[0], run, cur)
            return
        if not script:
            raise psycopg.ProgrammingError(
                "a query with parameters must be a single statement (the sandbox found "
                "transaction control among several)"
            )
        for st in stmts:
            piece = st.text.encode()
            if st.kind is Kind.OTHER:
                async with self._statement(st, st.text):
                    await cur.execute(piece)
            else:
                await self._control(st, lambda piece=piece: cur.execute(piece), cur)  # type: ignore[misc]

    @asynccontextmanager
    async def _statement(self, st: Statement | None, text: str | None) -> AsyncIterator[None]:
        box, plan, app = self._box, self._box.plan, self._app
        await box.run(plan.before_statement(app))
        try:
            yield
        except psycopg.Error as exc:
            box.note(exc)
            await self._failed()
            new = translate(exc, text, plan.lock_timeout)
            if new is exc:
                raise
            raise new from exc
        except BaseException:
            if box.real_status() == TransactionStatus.INERROR:
                await self._failed()
            else:
                await self._succeeded(st)
            raise
        await self._succeeded(st)

    async def _failed(self) -> None:
        if self._box.broken is None:
            await self._box.send(self._box.plan.statement_failed(self._app))

    async def _succeeded(self, st: Statement | None) -> None:
        plan = self._box.plan
        if st is not None and st.ddl:
            plan.note_ddl(st)
        await self._box.run(plan.after_statement(self._app))

    async def _control(
        self, st: Statement, run: Callable[[], Awaitable[Any]], cur: psycopg.AsyncCursor[Any]
    ) -> None:
        box, plan, app = self._box, self._box.plan, self._app
        kind = st.kind
        if kind is Kind.REFUSED:
            raise refused(st)
        if kind is Kind.BEGIN:
            await box.run(plan.begin(app, st), cur)
        elif kind is Kind.COMMIT:
            await self._end(commit=True, cur=cur)
            if st.chain:
                await box.run(plan.begin(app), cur)
        elif kind is Kind.ROLLBACK:
            await self._end(commit=False, cur=cur)
            if st.chain:
                await box.run(plan.begin(app), cur)
        elif kind is Kind.SET_TRANSACTION:
            if app.autocommit and not app.frames:
                return  # production: a warning, no effect
            await box.run(plan.before_statement(app))
            if st.read_only:
                await box.run(Step("SET TRANSACTION READ ONLY"), cur)
                app.frames[0].read_only = True
            else:
                logger.debug("ignored in a sandbox (one outer transaction): %s", st.text)
        else:  # the app's own SAVEPOINT / RELEASE / ROLLBACK TO
            if app.autocommit and not app.frames:
                try:
                    plan.check_user_savepoint(app, st)
                except EmulatedServerError as err:
                    raise emulated(err) from None
            await box.run(plan.before_statement(app))
            try:
                await run()
            except psycopg.Error as exc:
                box.note(exc)
                raise
            plan.user_savepoint_done(app, st)

    # ------------------------------------------------------------------ transactions

    async def _end(self, *, commit: bool, cur: psycopg.AsyncCursor[Any] | None = None) -> None:
        plan, app = self._box.plan, self._app
        if commit and self._box.real_status() == TransactionStatus.INERROR and app.frames:
            commit = False  # COMMIT of a failed transaction rolls it back, as on the server
        await self._box.run(plan.commit(app) if commit else plan.rollback(app), cur)

    async def commit(self) -> None:
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit commit() forbidden within a Transaction context. (Transaction "
                "will be automatically committed on successful exit from context.)"
            )
        await self._end(commit=True)

    async def rollback(self) -> None:
        if self._closed and not self._box.closed:
            return
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit rollback() forbidden within a Transaction context. (Either raise "
                "Rollback() or allow an exception to propagate out of the context.)"
            )
        await self._end(commit=False)

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> AsyncSandboxTransaction:
        self._usable()
        return AsyncSandboxTransaction(self, savepoint_name, force_rollback)

    async def close(self) -> None:
        if self._closed:
            return
        if not self._box.closed and self._box.broken is None and self._app.frames:
            await self._end(commit=False)  # closing a connection discards its transaction
        self._closed = True
        if not self._pooled:
            self._checkin()

    def _checkin(self) -> None:
        if not self._returned:
            self._returned = True
            self._closed = True
            if not self._box.closed:
                self._box.lock.release()

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


_OWN_ATTRIBUTES = frozenset(
    {"row_factory", "autocommit", "read_only", "isolation_level", "deferrable"}
)


class _Info:
    """``conn.info`` with the transaction status production would show."""

    def __init__(self, conn: AsyncSandboxConnection) -> None:
        self._conn = conn

    @property
    def transaction_status(self) -> TransactionStatus:
        box = self._conn._box
        if box.closed or self._conn._closed:
            return TransactionStatus.UNKNOWN
        return app_status(self._conn._app, box.real_status())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn._real.info, name)


class _NoPipeline:
    async def sync(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<sandbox pipeline (statements run one by one)>"


class AsyncSandboxTransaction:
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    def __init__(
        self, conn: AsyncSandboxConnection, savepoint_name: str | None, force_rollback: bool
    ) -> None:
        self._conn = conn
        self.savepoint_name = savepoint_name
        self.force_rollback = force_rollback
        self._frame: Frame | None = None

    @property
    def connection(self) -> AsyncSandboxConnection:
        return self._conn

    async def __aenter__(self) -> AsyncSandboxTransaction:
        conn = self._conn
        conn._usable()
        name = quote_ident(self.savepoint_name) if self.savepoint_name else None
        step, self._frame = conn._box.plan.block(conn._app, name)
        await conn._box.run(step)
        conn._blocks += 1
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        conn = self._conn
        conn._blocks -= 1
        assert self._frame is not None
        swallow = isinstance(e, psycopg.Rollback) and e.transaction in (None, self)  # type: ignore[comparison-overlap]
        commit = et is None and not self.force_rollback
        if conn._box.closed or conn._box.broken is not None:
            return False
        if commit and conn._box.real_status() == TransactionStatus.INERROR:
            commit = False
        try:
            await conn._box.run(conn._box.plan.end_block(conn._app, self._frame, commit=commit))
        except Exception:
            if et is None:
                raise
            logger.warning("error ignored while rolling back a transaction block", exc_info=True)
        return swallow


class AsyncSandboxCursor:
    """A psycopg async cursor whose statements go through the sandbox's plan."""

    def __init__(self, conn: AsyncSandboxConnection, real: psycopg.AsyncCursor[Any]) -> None:
        self._conn = conn
        self._real = real

    @property
    def connection(self) -> AsyncSandboxConnection:
        return self._conn

    async def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> AsyncSandboxCursor:
        real = self._real
        # Server-side cursors take neither option: pass only what the app gave.
        options = {k: v for k, v in (("prepare", prepare), ("binary", binary)) if v is not None}
        await self._conn._run(
            query, not params, lambda: real.execute(query, params, **options), real
        )
        return self

    async def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        real = self._real
        await self._conn._run(
            query, False, lambda: real.executemany(query, params_seq, returning=returning), real
        )

    async def stream(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        self._conn._usable()
        text = query_text(query, self._conn._real)
        async with self._conn._statement(None, text):
            async for row in self._real.stream(query, params, **kwargs):
                yield row

    @asynccontextmanager
    async def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        self._conn._usable()
        text = query_text(statement, self._conn._real)
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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
