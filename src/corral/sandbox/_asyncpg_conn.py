"""The asyncpg proxies the application holds in a sandbox: connection, transaction,
prepared statement. Each statement and transaction operation goes through the plan.

asyncpg has no autocommit switch: outside ``conn.transaction()`` (or SQL ``BEGIN``) every
statement commits on its own, so here it runs in its own savepoint.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from asyncpg import exceptions as pgexc

from corral.errors import SandboxError, SandboxLockTimeout
from corral.sandbox._locks import AsyncOwnerLock, reads
from corral.sandbox._messages import is_lock_timeout, lock_contention, refused
from corral.sandbox._plan import AppState, EmulatedServerError, FrameKind, Kind, Statement, Step
from corral.sandbox._plan import classify_script as _classify_script
from corral.sandbox._proxy import ProxyBase, ProxyBox

if TYPE_CHECKING:
    from corral.sandbox._plan import Frame

__all__ = [
    "AsyncpgLockTimeout",
    "AsyncpgSandboxConnection",
    "AsyncpgSandboxPreparedStatement",
    "AsyncpgSandboxTransaction",
    "SandboxIsolationError",
]

logger = logging.getLogger("corral.sandbox.asyncpg")

T = TypeVar("T")

#: asyncpg's spelling of isolation levels -> PostgreSQL's (``SHOW transaction_isolation``).
_ISOLATION = {
    "read_uncommitted": "read uncommitted",
    "read_committed": "read committed",
    "repeatable_read": "repeatable read",
    "serializable": "serializable",
}


class AsyncpgLockTimeout(SandboxLockTimeout, pgexc.LockNotAvailableError):  # type: ignore[misc]
    """Lock contention in a sandbox; still an ``asyncpg.exceptions.LockNotAvailableError``."""

    def __init__(self, message: str) -> None:
        SandboxLockTimeout.__init__(self, message)


class SandboxIsolationError(SandboxError, pgexc.InterfaceError):  # type: ignore[misc]
    """``transaction(isolation=...)`` asks for a level the sandbox's transaction cannot have.

    Also an ``asyncpg.InterfaceError``, which asyncpg itself raises for a nested
    transaction whose isolation differs from its outer one: the same situation.
    """

    def __init__(self, message: str) -> None:
        pgexc.InterfaceError.__init__(self, message)


def _emulated(err: EmulatedServerError) -> Exception:
    cls: type[Exception] = pgexc.PostgresError
    for candidate in vars(pgexc).values():
        if (
            isinstance(candidate, type)
            and issubclass(candidate, pgexc.PostgresError)
            and getattr(candidate, "sqlstate", None) == err.sqlstate
        ):
            cls = candidate
            break
    return cls(str(err))


def _translate(exc: Exception, text: str | None, lock_timeout: float | None) -> Exception:
    if isinstance(exc, pgexc.LockNotAvailableError) and is_lock_timeout(
        exc.sqlstate, getattr(exc, "server_source_function", None)
    ):
        return AsyncpgLockTimeout(
            lock_contention(lock_timeout, getattr(exc, "context", None), text)
        )
    return exc


class Box(ProxyBox, Protocol):
    """What these proxies need of their box (:mod:`._asyncpg`'s, which imports this
    module): said here, so this module needs nothing from there."""

    #: the real transaction is failed until a ROLLBACK (TO) (asyncpg does not say)
    inerror: bool

    @property
    def lock(self) -> AsyncOwnerLock: ...
    @property
    def generation(self) -> int: ...
    def note(self, exc: BaseException) -> None: ...
    async def run(self, step: Step | None) -> None: ...
    async def isolation(self) -> str: ...
    async def reload_schema(self) -> None: ...
    async def prepare(self, query: str, **options: Any) -> Any: ...


class AsyncpgSandboxConnection(ProxyBase[Box]):
    """The application's view of the sandbox's connection: an ``asyncpg.Connection``
    look-alike. Anything not about statements or transactions is the real connection's
    (``__getattr__`` forwards: type codecs, server version, settings, ...).
    """

    _get_another: ClassVar[str] = "acquire a new"

    def __init__(self, box: Box, *, pooled: bool = True) -> None:
        self._top: AsyncpgSandboxTransaction | None = None
        super().__init__(box, AppState(autocommit=True), pooled=pooled)

    # ------------------------------------------------------------------ state

    def _closed_error(self) -> Exception:
        error: Exception = pgexc.InterfaceError(
            "cannot call Connection methods: connection is closed"
        )
        return error

    def is_closed(self) -> bool:
        """Same as :attr:`closed` (the attribute every corral proxy has)."""
        return self.closed

    def is_in_transaction(self) -> bool:
        """Whether the application's transaction is open (as asyncpg would report it)."""
        return bool(self._app.frames)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<AsyncpgSandboxConnection of {self._real!r}>"

    # ------------------------------------------------------------------ statements

    async def _run(
        self, query: str, run: Callable[[], Awaitable[Any]], *, script: bool, status: bool = False
    ) -> Any:
        """Run one app statement (or, without arguments, a script) through the plan.

        Transaction control returns its status text when *status* (``execute``), else
        None (``fetchval("BEGIN")`` is None in asyncpg too).
        """
        self._usable()
        self._box.plan.note_sql(query)
        stmts = _classify_script(query)
        if len(stmts) == 1 and stmts[0].kind is Kind.OTHER:
            return await self._statement(stmts[0], query, run)
        if len(stmts) == 1:
            result = await self._control(stmts[0], run)
            return result if status else None
        if not script:
            raise pgexc.InterfaceError(
                "a query with arguments must be a single statement (the sandbox found "
                "transaction control among several)"
            )
        last: Any = None
        for st in stmts:

            async def piece(text: str = st.text) -> Any:
                return await self._real.execute(text)

            if st.kind is Kind.OTHER:
                last = await self._statement(st, st.text, piece)
            else:
                last = await self._control(st, piece)
        return last

    async def _statement(
        self, st: Statement | None, text: str | None, run: Callable[[], Awaitable[T]]
    ) -> T:
        async with self._box.lock.turn(self._app, self._timeout, write=not reads(st)):
            return await self._statement_in_turn(st, text, run)

    async def _statement_in_turn(
        self, st: Statement | None, text: str | None, run: Callable[[], Awaitable[T]]
    ) -> T:
        box, plan, app = self._box, self._box.plan, self._app
        for attempt in (1, 2):
            await box.run(plan.before_statement(app))
            own_savepoint = bool(app.frames) and app.frames[-1].kind is FrameKind.STATEMENT
            try:
                result = await run()
            except Exception as exc:
                box.note(exc)
                await self._failed()
                if (
                    attempt == 1
                    and own_savepoint
                    and isinstance(exc, pgexc.InvalidCachedStatementError)
                    and box.broken is None
                ):
                    # asyncpg re-prepares a statement whose cached plan went stale (DDL)
                    # and retries it, outside a transaction - which this statement is,
                    # for the app. Its savepoint is rolled back: retry the same way.
                    await box.reload_schema()
                    continue
                new = _translate(exc, text, plan.lock_timeout)
                if new is exc:
                    raise
                raise new from exc
            except BaseException:
                await self._failed()
                raise
            await self._succeeded(st)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _failed(self) -> None:
        box = self._box
        if box.broken is None:
            box.inerror = True
            await box.run(box.plan.statement_failed(self._app))

    async def _succeeded(self, st: Statement | None) -> None:
        box, plan = self._box, self._box.plan
        if st is not None and st.ddl:
            plan.note_ddl(st)
            await box.reload_schema()
        await box.run(plan.after_statement(self._app))

    async def _control(self, st: Statement, run: Callable[[], Awaitable[Any]]) -> Any:
        async with self._box.lock.turn(self._app, self._timeout, write=False):
            return await self._control_in_turn(st, run)

    async def _control_in_turn(self, st: Statement, run: Callable[[], Awaitable[Any]]) -> Any:
        box, plan, app = self._box, self._box.plan, self._app
        kind = st.kind
        if kind is Kind.REFUSED:
            raise refused(st)
        if kind is Kind.BEGIN:
            await box.run(plan.begin(app, st))
        elif kind in (Kind.COMMIT, Kind.ROLLBACK):
            try:
                plan.check_chain(app, st)
            except EmulatedServerError as err:
                raise _emulated(err) from None
            await self._end(commit=kind is Kind.COMMIT)
        elif kind is Kind.SET_TRANSACTION:
            if not app.frames:
                return "SET"  # production: a warning, no effect
            if st.read_only:
                await box.run(Step("SET TRANSACTION READ ONLY"))
                app.frames[0].read_only = True
            else:
                logger.debug("ignored in a sandbox (one outer transaction): %s", st.text)
            return "SET"
        else:  # the app's own SAVEPOINT / RELEASE / ROLLBACK TO
            try:
                plan.check_user_savepoint(app, st)
            except EmulatedServerError as err:
                raise _emulated(err) from None
            await box.run(plan.before_statement(app))
            try:
                instead = plan.foreign_savepoint(app, st, failed=box.inerror)
            except EmulatedServerError as err:
                raise _emulated(err) from None
            if instead is not None:
                box.inerror = True
                await box.run(instead)  # fails, as production's statement
                raise AssertionError("a statement made to fail succeeded")  # pragma: no cover
            try:
                result = await run()
            except Exception as exc:
                box.note(exc)
                raise
            plan.user_savepoint_done(app, st)
            if kind is Kind.ROLLBACK_TO:
                box.inerror = False
            return result
        if st.chain and kind in (Kind.COMMIT, Kind.ROLLBACK):
            await box.run(plan.begin(app))
        return st.command

    async def _end(self, *, commit: bool) -> None:
        box, plan, app = self._box, self._box.plan, self._app
        if commit and box.inerror and app.frames:
            commit = False  # COMMIT of a failed transaction rolls it back, as on the server
        async with box.lock.turn(app, self._timeout, write=False):
            await box.run(plan.commit(app) if commit else plan.rollback(app))

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        real = self._real
        result = await self._run(
            query,
            lambda: real.execute(query, *args, timeout=timeout),
            script=not args,
            status=True,
        )
        return str(result)

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        real = self._real
        await self._run(
            command, lambda: real.executemany(command, args, timeout=timeout), script=False
        )

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        real = self._real
        rows = await self._run(query, lambda: real.fetch(query, *args, **kwargs), script=False)
        return rows if rows is not None else []

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        real = self._real
        return await self._run(query, lambda: real.fetchrow(query, *args, **kwargs), script=False)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        real = self._real
        return await self._run(query, lambda: real.fetchval(query, *args, **kwargs), script=False)

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> list[Any]:
        real = self._real
        rows = await self._run(query, lambda: real.fetchmany(query, args, **kwargs), script=False)
        return rows if rows is not None else []

    async def prepare(self, query: str, **kwargs: Any) -> AsyncpgSandboxPreparedStatement:
        """Like ``Connection.prepare``; its executions go through the sandbox's plan."""
        self._usable()
        async with self._box.lock.turn(self._app, self._timeout, write=False):
            real = await self._box.prepare(query, **kwargs)
        return AsyncpgSandboxPreparedStatement(self, query, real, kwargs)

    def cursor(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """Like ``Connection.cursor``: only inside a transaction, as in asyncpg."""
        self._usable()
        if not self._app.frames:
            raise pgexc.NoActiveSQLTransactionError(
                "cursor cannot be created outside of a transaction"
            )
        # Its fetches use the connection outside any statement turn: the transaction
        # keeps its turn (is never lent) until it ends.
        self._app.wrote = True
        return self._real.cursor(query, *args, **kwargs)

    async def _other(self, run: Callable[[], Awaitable[T]]) -> T:
        self._usable()
        return await self._statement(None, None, run)

    async def copy_from_table(self, table_name: str, **kwargs: Any) -> str:
        real = self._real
        return str(await self._other(lambda: real.copy_from_table(table_name, **kwargs)))

    async def copy_from_query(self, query: str, *args: Any, **kwargs: Any) -> str:
        real = self._real
        return str(await self._other(lambda: real.copy_from_query(query, *args, **kwargs)))

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        real = self._real
        return str(await self._other(lambda: real.copy_to_table(table_name, **kwargs)))

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        real = self._real
        return str(await self._other(lambda: real.copy_records_to_table(table_name, **kwargs)))

    async def add_listener(self, channel: str, callback: Any) -> None:
        # LISTEN runs inside the sandbox's transaction: it takes effect, but NOTIFY is
        # only delivered at commit, which never comes (docs/sandbox.md, known limits).
        real = self._real
        await self._other(lambda: real.add_listener(channel, callback))

    async def remove_listener(self, channel: str, callback: Any) -> None:
        real = self._real
        await self._other(lambda: real.remove_listener(channel, callback))

    # ------------------------------------------------------------------ transactions

    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False, deferrable: bool = False
    ) -> AsyncpgSandboxTransaction:
        """Like ``Connection.transaction``: the outermost one becomes a savepoint."""
        self._usable()
        if isolation and isolation not in _ISOLATION:
            raise ValueError(
                f"isolation is expected to be either of {tuple(_ISOLATION)}, got {isolation!r}"
            )
        return AsyncpgSandboxTransaction(self, isolation, readonly, deferrable)

    async def reset(self, *, timeout: float | None = None) -> None:
        """What the pool does at release, minus RESET ALL / UNLISTEN (see module doc)."""
        if self._open_work():
            await self._end(commit=False)
        self._top = None

    async def close(self, *, timeout: float | None = None) -> None:
        if self._closed:
            return
        if self._open_work():
            await self._end(commit=False)  # closing a connection discards its transaction
        self._closed_now()

    def terminate(self) -> None:
        self._closed_now()


class AsyncpgSandboxTransaction:
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    def __init__(
        self,
        conn: AsyncpgSandboxConnection,
        isolation: str | None,
        readonly: bool,
        deferrable: bool,
    ) -> None:
        self._conn = conn
        self._isolation = isolation
        self._readonly = readonly
        self._deferrable = deferrable
        self._frame: Frame | None = None
        self._state = "new"
        self._managed = False

    def _check(self, op: str, *allowed: str) -> None:
        if self._state not in allowed:
            state = {"new": "not yet started", "started": "already started"}.get(
                self._state, f"already {self._state}"
            )
            raise pgexc.InterfaceError(f"cannot {op}; the transaction is {state}")

    async def start(self) -> None:
        """Enter the block: the app's outermost transaction, or a nested one."""
        conn = self._conn
        async with conn._box.lock.turn(conn._app, conn._timeout, write=False):
            await self._start()

    async def _start(self) -> None:
        conn = self._conn
        conn._usable()
        self._check("start", "new")
        box, app = conn._box, conn._app
        top = conn._top
        if top is None:
            if app.frames:
                raise pgexc.InterfaceError(
                    "cannot use Connection.transaction() in a manually started transaction"
                )
            if self._isolation:
                await self._check_isolation()
        elif self._isolation:
            outer = top._isolation or await box.isolation()
            if _ISOLATION[self._isolation] != _ISOLATION.get(outer, outer):
                raise pgexc.InterfaceError(
                    "nested transaction has a different isolation level: current "
                    f"{self._isolation!r} != outer {outer!r}"
                )
        step, self._frame = box.plan.block(app)
        if top is None and self._readonly:
            step = step._replace(sql=step.sql + "; SET TRANSACTION READ ONLY")
            self._frame.read_only = True
        try:
            await box.run(step)
        except BaseException:
            self._state = "failed"
            raise
        if top is None:
            conn._top = self
        self._state = "started"

    async def _check_isolation(self) -> None:
        assert self._isolation is not None
        box = self._conn._box
        wanted = _ISOLATION[self._isolation]
        have = await box.isolation()
        if wanted == have or {wanted, have} == {"read committed", "read uncommitted"}:
            return  # READ UNCOMMITTED is READ COMMITTED in PostgreSQL
        raise SandboxIsolationError(
            f"transaction(isolation={self._isolation!r}) cannot be honoured in this sandbox: "
            f"its one outer transaction runs at {have.upper()}, and PostgreSQL cannot change "
            "the isolation level of a transaction once it has started (the app's "
            "transaction is a savepoint inside it). Open the sandbox at that level: "
            f"sandbox(pool, isolation_level={wanted.upper()!r}), or run this test outside "
            "the sandbox (@pytest.mark.no_sandbox)."
        )

    async def _finish(self, *, commit: bool) -> None:
        conn = self._conn
        async with conn._box.lock.turn(conn._app, conn._timeout, write=False):
            await self._finish_in_turn(commit=commit)

    async def _finish_in_turn(self, *, commit: bool) -> None:
        conn = self._conn
        self._check("commit" if commit else "rollback", "started")
        if conn._top is self:
            conn._top = None
        box = conn._box
        if box.closed or box.broken is not None:
            self._state = "failed"
            box.check()
        assert self._frame is not None
        if commit and box.inerror:
            commit = False
        try:
            await box.run(box.plan.end_block(conn._app, self._frame, commit=commit))
        except BaseException:
            self._state = "failed"
            raise
        if not commit:
            box.inerror = False
        self._state = "committed" if commit else "rolledback"

    async def commit(self) -> None:
        """Leave the block keeping its work (RELEASE SAVEPOINT)."""
        await self._finish(commit=True)

    async def rollback(self) -> None:
        """Leave the block discarding its work (ROLLBACK TO SAVEPOINT)."""
        await self._finish(commit=False)

    async def __aenter__(self) -> AsyncpgSandboxTransaction:
        if self._managed:
            raise pgexc.InterfaceError("cannot enter context: already in an `async with` block")
        self._managed = True
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._finish(commit=et is None)
        finally:
            self._managed = False

    def __repr__(self) -> str:
        return f"<AsyncpgSandboxTransaction state={self._state}>"


class AsyncpgSandboxPreparedStatement:
    """What ``conn.prepare()`` returns in a sandbox; executions go through the plan.

    The statement re-prepares itself when the sandbox's schema changed (DDL ran, or a
    sandbox that ran DDL was rolled back), instead of failing on a stale plan.
    """

    def __init__(
        self,
        conn: AsyncpgSandboxConnection,
        query: str,
        real: Any,
        options: dict[str, Any],
    ) -> None:
        self._conn = conn
        self._query = query
        self._real = real
        self._options = options
        self._generation = conn._box.generation

    async def _current(self) -> Any:
        box = self._conn._box
        if self._generation != box.generation:
            self._real = await box.prepare(self._query, **self._options)
            self._generation = box.generation
        return self._real

    async def _exec(self, name: str, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn

        async def run() -> Any:
            real = await self._current()
            return await getattr(real, name)(*args, **kwargs)

        return await conn._run(self._query, run, script=False)

    async def fetch(self, *args: Any, timeout: float | None = None) -> list[Any]:
        rows = await self._exec("fetch", *args, timeout=timeout)
        return rows if rows is not None else []

    async def fetchrow(self, *args: Any, timeout: float | None = None) -> Any:
        return await self._exec("fetchrow", *args, timeout=timeout)

    async def fetchval(self, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return await self._exec("fetchval", *args, column=column, timeout=timeout)

    async def fetchmany(self, args: Any, *, timeout: float | None = None) -> list[Any]:
        rows = await self._exec("fetchmany", args, timeout=timeout)
        return rows if rows is not None else []

    async def executemany(self, args: Any, *, timeout: float | None = None) -> None:
        await self._exec("executemany", args, timeout=timeout)

    async def explain(self, *args: Any, analyze: bool = False) -> Any:
        return await self._exec("explain", *args, analyze=analyze)

    def get_query(self) -> str:
        return self._query

    def get_statusmsg(self) -> str:
        # A statement the sandbox ran as something else (BEGIN as a SAVEPOINT) left the
        # real one unexecuted, whose status is None: SQLAlchemy 2.0's asyncpg dialect
        # matches a regex against it.
        status = self._real.get_statusmsg()
        return str(status) if status is not None else ""

    def __getattr__(self, name: str) -> Any:
        # get_attributes, get_parameters, get_name, cursor: the statement's own
        return getattr(self._real, name)
