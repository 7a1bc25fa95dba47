"""The logic of the psycopg proxies, written once for the sync and async shells: state
checks, settings, statement classification, the transaction-control flow. No I/O here:
each shell sends the steps this decides, with or without ``await``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar, overload

import psycopg
from psycopg.pq import TransactionStatus

from corral.errors import SandboxError
from corral.sandbox._plan import (
    AppState,
    EmulatedServerError,
    Frame,
    FrameKind,
    Kind,
    Statement,
    Step,
    quote_ident,
)
from corral.sandbox._plan import classify_script as _classify_script
from corral.sandbox._proxy import ProxyBase, ProxyBox
from corral.sandbox._psycopg_common import app_status, emulated, query_text, refused

__all__ = [
    "RUN_APP",
    "ConnectionBase",
    "ControlFlow",
    "CursorBase",
    "PsycopgBox",
    "RunApp",
    "Send",
    "TransactionBase",
]

logger = logging.getLogger("corral.sandbox.psycopg")

#: Settings kept on the proxy; any other attribute set on it is the real connection's.
_OWN_ATTRIBUTES = frozenset(
    {"row_factory", "autocommit", "read_only", "isolation_level", "deferrable"}
)


class Send(NamedTuple):
    """Run *step* (None: nothing to send) on the app's cursor, or on the box's own."""

    step: Step | None
    on_cursor: bool = False


class RunApp:
    """Run the application's own statement (its SAVEPOINT / RELEASE / ROLLBACK TO)."""


RUN_APP = RunApp()

#: What :meth:`ConnectionBase._control_flow` asks its shell to do, in order.
ControlFlow = Generator[Send | RunApp, None, None]

#: One statement of an app query as a shell runs it: its classification (None: unknown,
#: run as is), its text for messages, and the call that runs it.
Piece = tuple[Statement | None, str | None, Callable[[], Any]]


class PsycopgBox(ProxyBox, Protocol):
    """What a psycopg proxy needs of its box beyond :class:`~._proxy.ProxyBox`."""

    @property
    def app_autocommit(self) -> bool: ...
    @property
    def app_row_factory(self) -> Any: ...
    def real_status(self) -> TransactionStatus: ...


BoxT = TypeVar("BoxT", bound=PsycopgBox)
T = TypeVar("T")


class _Setting(Generic[T]):
    """One of psycopg's connection settings (``conn.autocommit``...): read where the proxy
    keeps it; assigned through the proxy's ``_set_<name>``, which refuses a change inside a
    transaction. An asyncio proxy refuses the assignment itself, as psycopg's
    ``AsyncConnection`` does: there, ``await conn.set_<name>(value)`` changes it.
    """

    def __init__(self, read: Callable[[ConnectionBase[Any]], T]) -> None:
        self._read = read
        self._name = ""

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, conn: None, owner: type[Any]) -> _Setting[T]: ...
    @overload
    def __get__(self, conn: ConnectionBase[Any], owner: type[Any]) -> T: ...
    def __get__(self, conn: ConnectionBase[Any] | None, owner: type[Any]) -> _Setting[T] | T:
        return self if conn is None else self._read(conn)

    def __set__(self, conn: ConnectionBase[Any], value: T) -> None:
        if conn._is_async:
            # psycopg's words (AsyncConnection._no_set_async)
            raise AttributeError(
                f"the {self._name!r} property is read-only on async connections: "
                f"please use 'await .set_{self._name}()' instead."
            )
        getattr(conn, f"_set_{self._name}")(value)


class ConnectionBase(ProxyBase[BoxT]):
    """A psycopg ``Connection`` look-alike's logic; the shells add the round trips."""

    _get_another: ClassVar[str] = "get a new"
    #: the asyncio shell (its settings change through ``await conn.set_<name>()`` only)
    _is_async: ClassVar[bool] = False

    def __init__(
        self,
        box: BoxT,
        *,
        autocommit: bool | None = None,
        row_factory: Any = None,
        pooled: bool = True,
    ) -> None:
        app = AppState(autocommit=box.app_autocommit if autocommit is None else autocommit)
        super().__init__(box, app, pooled=pooled)
        self.row_factory = row_factory if row_factory is not None else box.app_row_factory
        self._blocks = 0
        self._isolation_level: Any = None
        self._deferrable: bool | None = None

    # ------------------------------------------------------------------ state

    def _closed_error(self) -> Exception:
        return psycopg.OperationalError("the connection is closed")

    @property
    def broken(self) -> bool:
        return self._box.broken is not None

    autocommit = _Setting[bool](lambda conn: conn._app.autocommit)
    read_only = _Setting[bool | None](lambda conn: conn._app.read_only)
    isolation_level = _Setting[Any](lambda conn: conn._isolation_level)
    deferrable = _Setting[bool | None](lambda conn: conn._deferrable)

    def _check_settable(self, attribute: str) -> None:
        self._usable()
        if self._app.frames:
            status = app_status(self._app, self._box.real_status())
            raise psycopg.ProgrammingError(
                f"can't change {attribute!r} now: connection in transaction status {status.name}"
            )

    def _set_autocommit(self, value: bool) -> None:
        self._check_settable("autocommit")
        self._app.autocommit = bool(value)

    def _set_read_only(self, value: bool | None) -> None:
        self._check_settable("read_only")
        self._app.read_only = value

    def _set_isolation_level(self, value: Any) -> None:
        # Recorded, not applied: the sandbox's one outer transaction has one isolation
        # level (sandbox(..., isolation_level=...)); see docs/sandbox.md.
        self._check_settable("isolation_level")
        self._isolation_level = value

    def _set_deferrable(self, value: bool | None) -> None:
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
        return f"<{type(self).__name__} of {self._real!r}>"

    # ------------------------------------------------------------------ statements

    def _real_cursor(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._usable()
        kwargs.setdefault("row_factory", self.row_factory)
        return self._real.cursor(*args, **kwargs)

    def _pieces(self, query: Any, script: bool, run: Callable[[], Any], cur: Any) -> list[Piece]:
        """The statements of one app query (or script), each with the call that runs it."""
        self._usable()
        text = query_text(query, self._real)
        if text is None:
            stmts = None
        else:
            self._box.plan.note_sql(text)
            stmts = _classify_script(text)
        if stmts is None or len(stmts) == 1:
            return [(stmts[0] if stmts else None, text, run)]
        if not script:
            raise psycopg.ProgrammingError(
                "a query with parameters must be a single statement (the sandbox found "
                "transaction control among several)"
            )
        return [(st, st.text, _execute(cur, st.text)) for st in stmts]

    def _failure_sql(self) -> str | None:
        """What to send after the app's statement failed (None: nothing, or the box is lost)."""
        step = self._box.plan.statement_failed(self._app) if self._box.broken is None else None
        return step.sql if step is not None else None

    def _success_step(self, st: Statement | None) -> Step | None:
        """What to send after the app's statement *st* succeeded."""
        plan = self._box.plan
        if st is not None and st.ddl:
            plan.note_ddl(st)
        return plan.after_statement(self._app)

    def _control_flow(self, st: Statement) -> ControlFlow:
        """The steps of the app's transaction control statement *st*, in order."""
        plan, app = self._box.plan, self._app
        kind = st.kind
        if kind is Kind.REFUSED:
            raise refused(st)
        if kind is Kind.BEGIN:
            yield Send(plan.begin(app, st), on_cursor=True)
        elif kind in (Kind.COMMIT, Kind.ROLLBACK):
            try:
                plan.check_chain(app, st)
            except EmulatedServerError as err:
                raise emulated(err) from None
            yield Send(self._end_step(commit=kind is Kind.COMMIT), on_cursor=True)
            if st.chain:
                yield Send(plan.begin(app), on_cursor=True)
        elif kind is Kind.SET_TRANSACTION:
            if app.autocommit and not app.frames:
                return  # production: a warning, no effect
            yield Send(plan.before_statement(app))
            if st.read_only:
                yield Send(Step("SET TRANSACTION READ ONLY"), on_cursor=True)
                app.frames[0].read_only = True
            else:
                logger.debug("ignored in a sandbox (one outer transaction): %s", st.text)
        else:  # the app's own SAVEPOINT / RELEASE / ROLLBACK TO
            if app.autocommit and not app.frames:
                try:
                    plan.check_user_savepoint(app, st)
                except EmulatedServerError as err:
                    raise emulated(err) from None
            yield Send(plan.before_statement(app))
            failed = self._box.real_status() == TransactionStatus.INERROR
            try:
                instead = plan.foreign_savepoint(app, st, failed=failed)
            except EmulatedServerError as err:
                raise emulated(err) from None
            if instead is not None:
                yield Send(instead, on_cursor=True)  # fails, as production's statement
                return
            yield RUN_APP
            plan.user_savepoint_done(app, st)

    # ------------------------------------------------------------------ transactions

    def _end_step(self, *, commit: bool) -> Step | None:
        """The step ending the app's transaction: committing, or rolling back."""
        plan, app = self._box.plan, self._app
        if commit and self._box.real_status() == TransactionStatus.INERROR and app.frames:
            commit = False  # COMMIT of a failed transaction rolls it back, as on the server
        return plan.commit(app) if commit else plan.rollback(app)

    def _check_commit(self) -> None:
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit commit() forbidden within a Transaction context. (Transaction "
                "will be automatically committed on successful exit from context.)"
            )

    def _check_rollback(self) -> bool:
        """Whether rollback() has anything to do (not on a proxy closed by the app)."""
        if self._closed and not self._box.closed:
            return False
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit rollback() forbidden within a Transaction context. (Either raise "
                "Rollback() or allow an exception to propagate out of the context.)"
            )
        return True


def _execute(cur: Any, text: str) -> Callable[[], Any]:
    piece = text.encode()
    return lambda: cur.execute(piece)


class _Info:
    """``conn.info`` with the transaction status production would show."""

    def __init__(self, conn: ConnectionBase[Any]) -> None:
        self._conn = conn

    @property
    def transaction_status(self) -> TransactionStatus:
        box = self._conn._box
        if box.closed or self._conn._closed:
            return TransactionStatus.UNKNOWN
        return app_status(self._conn._app, box.real_status())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn._real.info, name)


ConnT = TypeVar("ConnT", bound=ConnectionBase[Any])


class TransactionBase(Generic[ConnT]):
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    def __init__(self, conn: ConnT, savepoint_name: str | None, force_rollback: bool) -> None:
        self._conn = conn
        self.savepoint_name = savepoint_name
        self.force_rollback = force_rollback
        self._frame: Frame | None = None

    @property
    def connection(self) -> ConnT:
        return self._conn

    def _enter_step(self) -> Step:
        """The step opening the block (the shell sends it, then counts the block in)."""
        conn = self._conn
        conn._usable()
        name = quote_ident(self.savepoint_name) if self.savepoint_name else None
        step: Step
        step, self._frame = conn._box.plan.block(conn._app, name)
        return step

    def _leaving(
        self, et: type[BaseException] | None, e: BaseException | None
    ) -> tuple[bool, bool] | None:
        """On leaving the block: (swallow the exception, commit), or None when the
        sandbox is gone and there is nothing to send."""
        conn = self._conn
        conn._blocks -= 1
        assert self._frame is not None
        swallow = isinstance(e, psycopg.Rollback) and e.transaction in (None, self)  # type: ignore[comparison-overlap]
        commit = et is None and not self.force_rollback
        if conn._box.closed or conn._box.broken is not None:
            return None
        if (
            commit
            and self._frame.kind is FrameKind.TRANSACTION
            and conn._box.real_status() == TransactionStatus.INERROR
        ):
            # COMMIT of a failed transaction rolls it back; a nested block's RELEASE
            # fails instead (25P02, from the server), as in production.
            commit = False
        return swallow, commit

    def _exit_step(self, *, commit: bool) -> Step | None:
        conn = self._conn
        frame = self._frame
        assert frame is not None
        app, plan = conn._app, conn._box.plan
        ended = frame not in app.frames and app.lost is None
        if ended and frame.kind is FrameKind.TRANSACTION:
            # The app's own SQL ended it; psycopg's COMMIT / ROLLBACK ends whatever
            # transaction is open now.
            ends: Step | None = conn._end_step(commit=commit)
            return ends
        if ended:
            # The app's own SQL ended this block's savepoint (COMMIT, ROLLBACK, RELEASE
            # or ROLLBACK TO past it): psycopg's RELEASE / ROLLBACK TO fails, as on the
            # server.
            command = "RELEASE SAVEPOINT" if commit else "ROLLBACK TO SAVEPOINT"
            try:
                fails: Step = plan.missing_savepoint(app, command, frame.name)
            except EmulatedServerError as err:
                raise emulated(err) from None
            return fails
        step: Step | None = plan.end_block(app, frame, commit=commit)
        return step


CurT = TypeVar("CurT")


class CursorBase(Generic[ConnT, CurT]):
    """A psycopg cursor whose statements go through the sandbox's plan."""

    def __init__(self, conn: ConnT, real: CurT) -> None:
        self._conn = conn
        self._real = real

    @property
    def connection(self) -> ConnT:
        return self._conn

    @staticmethod
    def _options(prepare: bool | None, binary: bool | None) -> dict[str, Any]:
        # Server-side cursors take neither option: pass only what the app gave.
        return {k: v for k, v in (("prepare", prepare), ("binary", binary)) if v is not None}

    def _text(self, query: Any) -> str | None:
        conn = self._conn
        conn._usable()
        text = query_text(query, conn._real)
        if text is not None:
            conn._box.plan.note_sql(text)
        return text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
