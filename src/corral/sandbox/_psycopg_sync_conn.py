"""The psycopg 3 sync proxies the application holds in a sandbox: connection, cursor,
transaction block. A thin shell over :mod:`._psycopg_proxy`: the round trips only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg.pq import TransactionStatus

from corral.sandbox._locks import OwnerLock, reads
from corral.sandbox._plan import Kind, Statement, Step
from corral.sandbox._psycopg_common import translate
from corral.sandbox._psycopg_proxy import (
    ConnectionBase,
    CursorBase,
    PsycopgBox,
    Send,
    TransactionBase,
)

__all__ = ["SandboxConnection", "SandboxCursor", "SandboxTransaction"]

logger = logging.getLogger("corral.sandbox.psycopg")


class Box(PsycopgBox, Protocol):
    """What these proxies need of their box (:mod:`._psycopg_sync`'s, which imports this
    module): said here, so this module needs nothing from there."""

    @property
    def lock(self) -> OwnerLock: ...
    def note(self, exc: BaseException) -> None: ...
    def run(self, step: Step | None, cursor: psycopg.Cursor[Any] | None = None) -> None: ...
    def send(self, sql: str | None) -> None: ...


class SandboxConnection(ConnectionBase[Box]):
    """The application's view of a sandbox connection: a psycopg ``Connection`` look-alike.

    Transaction control (``commit``, ``rollback``, ``transaction()``, ``autocommit``,
    SQL ``BEGIN``/``COMMIT``/...) becomes savepoints; everything else is psycopg's own
    connection (``__getattr__`` forwards).
    """

    # ------------------------------------------------------------------ settings

    @property
    def autocommit(self) -> bool:
        return self._app.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._set_autocommit(value)

    def set_autocommit(self, value: bool) -> None:
        self._set_autocommit(value)

    @property
    def read_only(self) -> bool | None:
        return self._app.read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._set_read_only(value)

    def set_read_only(self, value: bool | None) -> None:
        self._set_read_only(value)

    @property
    def isolation_level(self) -> Any:
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._set_isolation_level(value)

    def set_isolation_level(self, value: Any) -> None:
        self._set_isolation_level(value)

    @property
    def deferrable(self) -> bool | None:
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._set_deferrable(value)

    def set_deferrable(self, value: bool | None) -> None:
        self._set_deferrable(value)

    # ------------------------------------------------------------------ statements

    def cursor(self, *args: Any, **kwargs: Any) -> SandboxCursor:
        return SandboxCursor(self, self._real_cursor(args, kwargs))

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
        for st, text, piece in self._pieces(query, script, run, cur):
            if st is None or st.kind is Kind.OTHER:
                with self._statement(st, text):
                    piece()
            else:
                self._control(st, piece, cur)

    @contextmanager
    def _statement(self, st: Statement | None, text: str | None) -> Iterator[None]:
        box = self._box
        with box.lock.turn(self._app, self._timeout, write=not reads(st)):
            box.run(box.plan.before_statement(self._app))
            try:
                yield
            except psycopg.Error as exc:
                box.note(exc)
                box.send(self._failure_sql())
                new = translate(exc, text, box.plan.lock_timeout)
                if new is exc:
                    raise
                raise new from exc
            except BaseException:
                if box.real_status() == TransactionStatus.INERROR:
                    box.send(self._failure_sql())
                else:
                    box.run(self._success_step(st))
                raise
            box.run(self._success_step(st))

    def _control(self, st: Statement, run: Callable[[], Any], cur: psycopg.Cursor[Any]) -> None:
        box = self._box
        with box.lock.turn(self._app, self._timeout, write=False):
            for op in self._control_flow(st):
                if isinstance(op, Send):
                    box.run(op.step, cur if op.on_cursor else None)
                    continue
                try:
                    run()
                except psycopg.Error as exc:
                    box.note(exc)
                    raise

    # ------------------------------------------------------------------ transactions

    def _end(self, *, commit: bool, cur: psycopg.Cursor[Any] | None = None) -> None:
        with self._box.lock.turn(self._app, self._timeout, write=False):
            self._box.run(self._end_step(commit=commit), cur)

    def commit(self) -> None:
        self._check_commit()
        self._end(commit=True)

    def rollback(self) -> None:
        if self._check_rollback():
            self._end(commit=False)

    def transaction(
        self, savepoint_name: str | None = None, force_rollback: bool = False
    ) -> SandboxTransaction:
        self._usable()
        return SandboxTransaction(self, savepoint_name, force_rollback)

    def close(self) -> None:
        if self._closed:
            return
        if self._open_work():
            self._end(commit=False)  # closing a connection discards its transaction
        self._closed_now()

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


class _NoPipeline:
    def sync(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<sandbox pipeline (statements run one by one)>"


class SandboxTransaction(TransactionBase[SandboxConnection]):
    """What ``conn.transaction()`` returns in a sandbox: a savepoint block."""

    def __enter__(self) -> SandboxTransaction:
        conn = self._conn
        with conn._box.lock.turn(conn._app, conn._timeout, write=False):
            conn._box.run(self._enter_step())
        self._conn._blocks += 1
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        leaving = self._leaving(et, e)
        if leaving is None:
            return False
        swallow, commit = leaving
        try:
            conn = self._conn
            with conn._box.lock.turn(conn._app, conn._timeout, write=False):
                conn._box.run(self._exit_step(commit=commit))
        except Exception:
            # As psycopg: a failed commit raises; a failed rollback is logged, and the
            # block's own exception (a Rollback too) goes on.
            if commit:
                raise
            logger.warning("error ignored in rollback of a transaction block", exc_info=True)
            return False
        return swallow


class SandboxCursor(CursorBase[SandboxConnection, "psycopg.Cursor[Any]"]):
    """A psycopg cursor whose statements go through the sandbox's plan."""

    def execute(
        self,
        query: Any,
        params: Any = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> SandboxCursor:
        real, options = self._real, self._options(prepare, binary)
        self._conn._run(query, not params, lambda: real.execute(query, params, **options), real)
        return self

    def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
        real = self._real
        self._conn._run(
            query, False, lambda: real.executemany(query, params_seq, returning=returning), real
        )

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        text = self._text(query)
        with self._conn._statement(None, text):
            yield from self._real.stream(query, params, **kwargs)

    @contextmanager
    def copy(self, statement: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        text = self._text(statement)
        with self._conn._statement(None, text), self._real.copy(statement, params, **kwargs) as cp:
            yield cp

    def __iter__(self) -> Iterator[Any]:
        return iter(self._real)

    def __enter__(self) -> SandboxCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()
