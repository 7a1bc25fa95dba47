"""The psycopg 3 adapter, synchronous: ``ConnectionPool`` and connection factories.

In sandbox mode the app gets :class:`SandboxConnection` proxies of the sandbox's one
connection; every transaction operation goes through the :class:`~._plan.Plan`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from corral.sandbox._boxes import BoxController
from corral.sandbox._locks import OwnerLock
from corral.sandbox._plan import Step
from corral.sandbox._psycopg_common import (
    PsycopgBoxBase,
    SandboxCursors,
    factory_target,
    pool_target,
)
from corral.sandbox._psycopg_sync_conn import SandboxConnection
from corral.sandbox._targets import Target

__all__ = ["ConnectSandbox", "PoolSandbox"]

logger = logging.getLogger("corral.sandbox.psycopg")


class _Box(PsycopgBoxBase["psycopg.Connection[Any]"]):
    """One open sandbox on a psycopg connection."""

    def __init__(self, controller: _Controller, real: psycopg.Connection[Any]) -> None:
        super().__init__(controller._new_plan(), real)
        self.controller = controller
        self.lock = OwnerLock()
        self._cur: psycopg.Cursor[Any] | None = None

    def open(self) -> None:
        real = self.real
        if real.pgconn.transaction_status != TransactionStatus.IDLE:
            real.rollback()
        if not real.autocommit:
            real.autocommit = True  # the plan sends BEGIN/SAVEPOINT itself
        self._cur = self.controller._cursors.get(real)
        step = self.plan.open()
        self._cur.execute(step.script.encode())
        if step.ask:
            while self._cur.nextset():
                pass
            row = self._cur.fetchone()
            self.plan.opened(bool(row and row[0]))

    # ------------------------------------------------------------------ sending

    def run(self, step: Step | None, cursor: psycopg.Cursor[Any] | None = None) -> None:
        if step is None:
            return
        self.check()
        cur = cursor if cursor is not None else self._cur
        assert cur is not None
        try:
            cur.execute(step.sql.encode())
        except psycopg.Error as exc:
            self.note(exc)
            if step.undo and self.broken is None:
                try:
                    self._cur.execute(step.undo.encode())  # type: ignore[union-attr]
                except psycopg.Error as again:
                    self.note(again)
            raise

    def send(self, sql: str | None) -> None:
        if sql:
            self.run(Step(sql))

    # ------------------------------------------------------------------ closing

    def abort(self) -> None:
        """Kill the connection (a checkout never came back; the sandbox closes anyway)."""
        self.real.close()

    def rolled_back(self) -> None:
        """After a ROLLBACK TO of a sandbox level: nothing to refresh for psycopg."""

    def close(self) -> None:
        if not self._start_closing():
            return
        real = self.real
        if self.broken is None and not real.closed:
            try:
                self._cur.execute(self.plan.close().encode())  # type: ignore[union-attr]
                if real.autocommit != self.app_autocommit:
                    real.autocommit = self.app_autocommit
            except psycopg.Error as exc:
                logger.warning("rolling back a sandbox failed; discarding its connection: %s", exc)
                real.close()
        self.lock.force_release()
        self.controller._give(real)


class _Controller(BoxController[_Box]):
    """Sandbox operations common to the pool and the factory adapters."""

    _dead_errors = (psycopg.OperationalError,)
    _connection_kind = "psycopg"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._cursors = SandboxCursors()

    def _new_box(self, real: psycopg.Connection[Any]) -> _Box:
        return _Box(self, real)

    def _discard(self, real: psycopg.Connection[Any]) -> None:
        if not real.closed:
            real.close()

    def _new_proxy(self, box: _Box, **options: Any) -> SandboxConnection:
        return SandboxConnection(box, **options)


# ---------------------------------------------------------------------------- handles


class PoolSandbox(_Controller):
    """A sandboxed ``psycopg_pool.ConnectionPool``; use it exactly like the pool.

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

    def __enter__(self) -> PoolSandbox:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.__exit__(*exc)

    def _take(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self.pool.getconn()
        return conn

    def _give(self, real: psycopg.Connection[Any]) -> None:
        self.pool.putconn(real)

    def discard_idle(self) -> None:
        """Close the pool's idle connections; the pool opens new ones in their place.

        ``pool.drain()`` (psycopg_pool >= 3.3): connections checked out now are left
        alone, and closed when they come back. Older psycopg_pool has no such call:
        ``pool.check()`` replaces only the idle connections that no longer work.
        """
        drain = getattr(self.pool, "drain", None)
        if drain is not None:
            drain()
        else:
            self.pool.check()

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Like ``pool.connection()``: commit on success, roll back on error, return."""
        if not self.sandboxing:
            with self.pool.connection(timeout) as conn:
                yield conn
            return
        conn = self.getconn(timeout)
        try:
            with conn:
                yield conn
        finally:
            self.putconn(conn)

    def getconn(self, timeout: float | None = None) -> Any:
        """Like ``pool.getconn()``; in sandbox mode, a proxy of the sandbox's connection."""
        if not self.sandboxing:
            return self.pool.getconn(timeout)
        return self._checkout(timeout)

    def putconn(self, conn: Any) -> None:
        """Like ``pool.putconn()``; an open transaction is rolled back, as the pool does."""
        if not isinstance(conn, SandboxConnection):
            self.pool.putconn(conn)
            return
        if conn._open_work():
            logger.warning("rolling back returned connection: %s", conn)
            conn._end(commit=False)
        conn._checkin()


class ConnectSandbox(_Controller):
    """A sandboxed connection factory: ``db.connect()`` replaces ``psycopg.connect()``.

    :param connect: a conninfo string, or a callable returning a new
        ``psycopg.Connection`` (e.g. ``functools.partial(psycopg.connect, dsn)``).
    :param max_idle: connections kept open between sandboxes (connecting is slow).

    Other parameters as :class:`PoolSandbox`.
    """

    def __init__(
        self,
        connect: str | Callable[..., psycopg.Connection[Any]],
        *,
        max_idle: int = 4,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._factory = connect
        self.max_idle = max_idle
        self._idle: list[psycopg.Connection[Any]] = []

    def _target(self) -> Target | None:
        return factory_target(self._factory)

    def _new(self, **kwargs: Any) -> psycopg.Connection[Any]:
        if isinstance(self._factory, str):
            return psycopg.Connection.connect(self._factory, **kwargs)
        return self._factory(**kwargs)

    def _take(self) -> psycopg.Connection[Any]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.broken:
                return conn
        return self._new()

    def _give(self, real: psycopg.Connection[Any]) -> None:
        if real.closed or real.broken or len(self._idle) >= self.max_idle:
            real.close()
        else:
            self._idle.append(real)

    def connect(self, **kwargs: Any) -> Any:
        """A new connection; in sandbox mode, a proxy of the sandbox's connection.

        ``autocommit`` and ``row_factory`` are honoured in both modes; closing the proxy
        (or leaving ``with``) hands the sandbox's connection to its next user.
        """
        if not self.sandboxing:
            return self._new(**kwargs)
        return self._checkout(
            None,
            autocommit=bool(kwargs.get("autocommit", False)),
            row_factory=kwargs.get("row_factory"),
            pooled=False,
        )

    def discard_idle(self) -> None:
        """Close the connections kept for the next sandboxes (the app's own, made by
        ``connect()`` in normal mode, are the app's to close)."""
        while self._idle:
            self._idle.pop().close()

    def close(self) -> None:
        """Close the connections kept for the next sandboxes (as :meth:`discard_idle`)."""
        self.discard_idle()
