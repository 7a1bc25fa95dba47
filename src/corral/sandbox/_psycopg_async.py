"""The psycopg 3 adapter, asyncio: ``AsyncConnectionPool`` and async connection factories.

The same logic as :mod:`._psycopg_sync` with ``await`` at each round trip; the two
modules are kept line-for-line parallel so a fix in one is a fix in both.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from corral.errors import SandboxBroken, SandboxBusy, SandboxError
from corral.sandbox._controller import AsyncSandboxController, BoxBase
from corral.sandbox._locks import AsyncOwnerLock
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
from corral.sandbox._psycopg_common import (
    app_status,
    emulated,
    lost_note,
    query_text,
    refused,
    translate,
)

__all__ = [
    "AsyncConnectSandbox",
    "AsyncPoolSandbox",
    "AsyncSandboxConnection",
    "AsyncSandboxCursor",
]

logger = logging.getLogger("corral.sandbox.psycopg")

_OPEN_ATTEMPTS = 3


class _Box(BoxBase):
    """One open sandbox on a psycopg async connection."""

    def __init__(self, controller: _Controller, real: psycopg.AsyncConnection[Any]) -> None:
        super().__init__(controller._new_plan())
        self.controller = controller
        self.real = real
        self.lock = AsyncOwnerLock()
        self.proxies: weakref.WeakSet[AsyncSandboxConnection] = weakref.WeakSet()
        self.app_autocommit = real.autocommit
        self.app_row_factory = real.row_factory
        self._cur: psycopg.AsyncCursor[Any] | None = None

    async def open(self) -> None:
        real = self.real
        if real.info.transaction_status != TransactionStatus.IDLE:
            await real.rollback()
        if not real.autocommit:
            await real.set_autocommit(True)  # the plan sends BEGIN/SAVEPOINT itself
        self._cur = real.cursor(row_factory=tuple_row)
        step = self.plan.open()
        await self._cur.execute(step.sql.encode())
        if self.plan.asks_deferrable:
            while self._cur.nextset():
                pass
            row = await self._cur.fetchone()
            self.plan.opened(bool(row and row[0]))

    # ------------------------------------------------------------------ sending

    def check(self) -> None:
        if self.broken is not None:
            raise SandboxBroken(
                "the sandbox's connection was lost (backend terminated?); this test's "
                "data is gone. Close this sandbox; the next one gets a healthy connection."
            ) from self.broken
        if self.closed:
            raise SandboxError("the sandbox this connection belonged to is closed")

    def note(self, exc: BaseException) -> None:
        if self.broken is None and (self.real.closed or self.real.broken):
            self.broken = exc
            exc.add_note(lost_note())

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

    def real_status(self) -> TransactionStatus:
        if self.broken is not None or self.real.closed:
            return TransactionStatus.UNKNOWN
        return self.real.info.transaction_status

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proxy in list(self.proxies):
            proxy._detach()
        real = self.real
        if self.broken is None and not real.closed:
            try:
                await self._cur.execute(self.plan.close().encode())  # type: ignore[union-attr]
                if real.autocommit != self.app_autocommit:
                    await real.set_autocommit(self.app_autocommit)
            except psycopg.Error as exc:
                logger.warning("rolling back a sandbox failed; discarding its connection: %s", exc)
                await real.close()
        self.lock.force_release()
        await self.controller._give(real)


class _Controller(AsyncSandboxController[_Box]):
    """Sandbox operations common to the async pool and factory adapters."""

    async def _take(self) -> psycopg.AsyncConnection[Any]:
        raise NotImplementedError

    async def _give(self, real: psycopg.AsyncConnection[Any]) -> None:
        raise NotImplementedError

    async def _open_box(self) -> _Box:
        last: BaseException | None = None
        for _ in range(_OPEN_ATTEMPTS):
            real = await self._take()
            box = _Box(self, real)
            try:
                await box.open()
            except psycopg.OperationalError as exc:
                last = exc
                logger.info("discarding a dead connection while opening a sandbox: %s", exc)
                if not real.closed:
                    await real.close()
                await self._give(real)
                continue
            self._learn(box.plan)
            return box
        raise SandboxBroken(
            f"could not open a sandbox: {_OPEN_ATTEMPTS} connections in a row failed"
        ) from last

    async def create_sandbox(self, *, nest: bool = True) -> None:
        if not self.sandboxing:
            return
        outer = self._router.owned()
        if outer is not None and nest:
            await outer.lock.acquire(self.checkout_timeout)
            try:
                await outer.run(outer.plan.push_sandbox())
            finally:
                outer.lock.release()
            return
        box = await self._open_box()
        box.previous = outer
        self._router.set(box)

    async def close_sandbox(self) -> None:
        if not self.sandboxing:
            return
        box = self._owned()
        busy: SandboxBusy | None = None
        try:
            await box.lock.acquire(self.checkout_timeout)
        except SandboxBusy as exc:
            busy = exc  # close anyway: a leaked checkout must not leak the sandbox
            await box.real.close()
        try:
            if box.plan.depth > 1 and busy is None and box.broken is None:
                await box.run(box.plan.pop_sandbox())
                return
            await box.close()
            self._forget(box)
        finally:
            box.lock.release()
        if busy is not None:
            raise busy

    async def restore_sandbox(self) -> None:
        if not self.sandboxing:
            return
        box = self._owned()
        await box.lock.acquire(self.checkout_timeout)
        try:
            await box.run(box.plan.restore())
        finally:
            box.lock.release()

    async def _checkout(self, timeout: float | None, **options: Any) -> AsyncSandboxConnection:
        box = self._route()
        box.check()
        await box.lock.acquire(timeout if timeout is not None else self.checkout_timeout)
        return AsyncSandboxConnection(box, **options)


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
            query, params is None, lambda: real.execute(query, params, **options), real
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


# ---------------------------------------------------------------------------- handles


class AsyncPoolSandbox(_Controller):
    """A sandboxed ``psycopg_pool.AsyncConnectionPool``; use it exactly like the pool.

    Parameters as :class:`corral.sandbox.PoolSandbox`.
    """

    def __init__(self, pool: Any, **options: Any) -> None:
        super().__init__(**options)
        self.pool = pool

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
        if not conn.closed and conn._app.frames and conn._box.broken is None:
            logger.warning("rolling back returned connection: %s", conn)
            await conn._end(commit=False)
        conn._checkin()


class AsyncConnectSandbox(_Controller):
    """A sandboxed async connection factory: ``await db.connect()`` replaces
    ``await psycopg.AsyncConnection.connect()``.

    :param connect: a conninfo string, or a coroutine function returning a new
        ``psycopg.AsyncConnection``.

    Other parameters as :class:`corral.sandbox.ConnectSandbox`.
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

    async def connect(self, **kwargs: Any) -> Any:
        """A new connection; in sandbox mode, a proxy of the sandbox's connection."""
        if not self.sandboxing:
            return await self._new(**kwargs)
        return await self._checkout(
            None,
            autocommit=bool(kwargs.get("autocommit", False)),
            row_factory=kwargs.get("row_factory"),
            pooled=False,
        )

    async def close(self) -> None:
        """Close the connections kept for the next sandboxes."""
        while self._idle:
            await self._idle.pop().close()
