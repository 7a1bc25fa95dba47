"""The psycopg 3 sync proxies the application holds in a sandbox: connection, cursor,
transaction block. Each transaction operation goes through the sandbox's plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    from corral.sandbox._psycopg_sync import _Box

__all__ = ["SandboxConnection", "SandboxCursor", "SandboxTransaction"]

logger = logging.getLogger("corral.sandbox.psycopg")


class SandboxConnection:
    """The application's view of a sandbox connection: a psycopg ``Connection`` look-alike.

    Transaction control (``commit``, ``rollback``, ``transaction()``, ``autocommit``,
    SQL ``BEGIN``/``COMMIT``/...) becomes savepoints; everything else is psycopg's own
    connection (``__getattr__`` forwards).
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

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._check_settable("autocommit")
        self._app.autocommit = bool(value)

    def set_autocommit(self, value: bool) -> None:
        self.autocommit = value

    @property
    def read_only(self) -> bool | None:
        return self._app.read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._check_settable("read_only")
        self._app.read_only = value

    def set_read_only(self, value: bool | None) -> None:
        self.read_only = value

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

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        # Recorded, not applied: the sandbox's one outer transaction has one isolation
        # level (sandbox(..., isolation_level=...)); see docs/sandbox.md.
        self._check_settable("isolation_level")
        self._isolation_level = value

    def set_isolation_level(self, value: Any) -> None:
        self.isolation_level = value

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._check_settable("deferrable")
        self._deferrable = value

    def set_deferrable(self, value: bool | None) -> None:
        self.deferrable = value

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
        return f"<SandboxConnection of {self._real!r}>"

    # ------------------------------------------------------------------ statements

    def cursor(self, *args: Any, **kwargs: Any) -> SandboxCursor:
        self._usable()
        kwargs.setdefault("row_factory", self.row_factory)
        return SandboxCursor(self, self._real.cursor(*args, **kwargs))

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool = False,
    ) -> SandboxCursor:
        return self.cursor().execute(query, params, prepare=prepare, binary=binary or None)

    @contextmanager
    def pipeline(self) -> Iterator[_NoPipeline]:
        # Pipelined errors surface late, after the plan must have reacted; in a sandbox
        # statements run one by one instead (same results, no batching).
        self._usable()
        yield _NoPipeline()

    def _run(
        self, query: Any, script: bool, run: Callable[[], Any], cur: psycopg.Cursor[Any]
    ) -> None:
        """Run one app statement (or script) through the plan."""
        self._usable()
        text = query_text(query, self._real)
        stmts = _classify_script(text) if text is not None else None
        if stmts is None or (len(stmts) == 1 and stmts[0].kind is Kind.OTHER):
            with self._statement(stmts[0] if stmts else None, text):
                run()
            return
        if len(stmts) == 1:
            self._control(stmts[0], run, cur)
            return
        if not script:
            raise psycopg.ProgrammingError(
                "a query with parameters must be a single statement (the sandbox found "
                "transaction control among several)"
            )
        for st in stmts:
            piece = st.text.encode()
            if st.kind is Kind.OTHER:
                with self._statement(st, st.text):
                    cur.execute(piece)
            else:
                self._control(st, lambda piece=piece: cur.execute(piece), cur)  # type: ignore[misc]

    @contextmanager
    def _statement(self, st: Statement | None, text: str | None) -> Iterator[None]:
        box, plan, app = self._box, self._box.plan, self._app
        box.run(plan.before_statement(app))
        try:
            yield
        except psycopg.Error as exc:
            box.note(exc)
            self._failed()
            new = translate(exc, text, plan.lock_timeout)
            if new is exc:
                raise
            raise new from exc
        except BaseException:
            if box.real_status() == TransactionStatus.INERROR:
                self._failed()
            else:
                self._succeeded(st)
            raise
        self._succeeded(st)

    def _failed(self) -> None:
        if self._box.broken is None:
            self._box.send(self._box.plan.statement_failed(self._app))

    def _succeeded(self, st: Statement | None) -> None:
        plan = self._box.plan
        if st is not None and st.ddl:
            plan.note_ddl(st)
        self._box.run(plan.after_statement(self._app))

    def _control(self, st: Statement, run: Callable[[], Any], cur: psycopg.Cursor[Any]) -> None:
        box, plan, app = self._box, self._box.plan, self._app
        kind = st.kind
        if kind is Kind.REFUSED:
            raise refused(st)
        if kind is Kind.BEGIN:
            box.run(plan.begin(app, st), cur)
        elif kind is Kind.COMMIT:
            self._end(commit=True, cur=cur)
            if st.chain:
                box.run(plan.begin(app), cur)
        elif kind is Kind.ROLLBACK:
            self._end(commit=False, cur=cur)
            if st.chain:
                box.run(plan.begin(app), cur)
        elif kind is Kind.SET_TRANSACTION:
            if app.autocommit and not app.frames:
                return  # production: a warning, no effect
            box.run(plan.before_statement(app))
            if st.read_only:
                box.run(Step("SET TRANSACTION READ ONLY"), cur)
                app.frames[0].read_only = True
            else:
                logger.debug("ignored in a sandbox (one outer transaction): %s", st.text)
        else:  # the app's own SAVEPOINT / RELEASE / ROLLBACK TO
            if app.autocommit and not app.frames:
                try:
                    plan.check_user_savepoint(app, st)
                except EmulatedServerError as err:
                    raise emulated(err) from None
            box.run(plan.before_statement(app))
            try:
                run()
            except psycopg.Error as exc:
                box.note(exc)
                raise
            plan.user_savepoint_done(app, st)

    # ------------------------------------------------------------------ transactions

    def _end(self, *, commit: bool, cur: psycopg.Cursor[Any] | None = None) -> None:
        plan, app = self._box.plan, self._app
        if commit and self._box.real_status() == TransactionStatus.INERROR and app.frames:
            commit = False  # COMMIT of a failed transaction rolls it back, as on the server
        self._box.run(plan.commit(app) if commit else plan.rollback(app), cur)

    def commit(self) -> None:
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit commit() forbidden within a Transaction context. (Transaction "
                "will be automatically committed on successful exit from context.)"
            )
        self._end(commit=True)

    def rollback(self) -> None:
        if self._closed and not self._box.closed:
            return
        self._usable()
        if self._blocks:
            raise psycopg.ProgrammingError(
                "Explicit rollback() forbidden within a Transaction context. (Either raise "
                "Rollback() or allow an exception to propagate out of the context.)"
            )
        self._end(commit=False)

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> SandboxTransaction:
        self._usable()
        return SandboxTransaction(self, savepoint_name, force_rollback)

    def close(self) -> None:
        if self._closed:
            return
        if not self._box.closed and self._box.broken is None and self._app.frames:
            self._end(commit=False)  # closing a connection discards its transaction
        self._closed = True
        if not self._pooled:
            self._checkin()

    def _checkin(self) -> None:
        if not self._returned:
            self._returned = True
            self._closed = True
            if not self._box.closed:
                self._box.lock.release()

    def __enter__(self) -> SandboxConnection:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.closed:
            if not self._pooled:
                self._checkin()
            return
        if et is None:
            self.commit()
        else:
            try:
                self.rollback()
            except Exception as exc:
                logger.warning("error ignored in rollback on %s: %s", self, exc)
        if not self._pooled:
            self.close()


_OWN_ATTRIBUTES = frozenset(
    {"row_factory", "autocommit", "read_only", "isolation_level", "deferrable"}
)


class _Info:
    """``conn.info`` with the transaction status production would show."""

    def __init__(self, conn: SandboxConnection) -> None:
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
    def sync(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<sandbox pipeline (statements run one by one)>"


class SandboxTransaction:
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    def __init__(
        self, conn: SandboxConnection, savepoint_name: str | None, force_rollback: bool
    ) -> None:
        self._conn = conn
        self.savepoint_name = savepoint_name
        self.force_rollback = force_rollback
        self._frame: Frame | None = None

    @property
    def connection(self) -> SandboxConnection:
        return self._conn

    def __enter__(self) -> SandboxTransaction:
        conn = self._conn
        conn._usable()
        name = quote_ident(self.savepoint_name) if self.savepoint_name else None
        step, self._frame = conn._box.plan.block(conn._app, name)
        conn._box.run(step)
        conn._blocks += 1
        return self

    def __exit__(
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
            conn._box.run(conn._box.plan.end_block(conn._app, self._frame, commit=commit))
        except Exception:
            if et is None:
                raise
            logger.warning("error ignored while rolling back a transaction block", exc_info=True)
        return swallow


class SandboxCursor:
    """A psycopg cursor whose statements go through the sandbox's plan."""

    def __init__(self, conn: SandboxConnection, real: psycopg.Cursor[Any]) -> None:
        self._conn = conn
        self._real = real

    @property
    def connection(self) -> SandboxConnection:
        return self._conn

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> SandboxCursor:
        real = self._real
        # Server-side cursors take neither option: pass only what the app gave.
        options = {k: v for k, v in (("prepare", prepare), ("binary", binary)) if v is not None}
        self._conn._run(query, not params, lambda: real.execute(query, params, **options), real)
        return self

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        real = self._real
        self._conn._run(
            query, False, lambda: real.executemany(query, params_seq, returning=returning), real
        )

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        self._conn._usable()
        text = query_text(query, self._conn._real)
        with self._conn._statement(None, text):
            yield from self._real.stream(query, params, **kwargs)

    @contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        self._conn._usable()
        text = query_text(statement, self._conn._real)
        with self._conn._statement(None, text), self._real.copy(statement, params, **kwargs) as cp:
            yield cp

    def __iter__(self) -> Iterator[Any]:
        return iter(self._real)

    def __enter__(self) -> SandboxCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)
