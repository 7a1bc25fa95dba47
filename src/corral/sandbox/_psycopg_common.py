"""What the sync and async psycopg adapters share: query text, error mapping, the
transaction status the application sees, the boxes' state. No I/O here.
"""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row

from corral.errors import SandboxLockTimeout
from corral.sandbox._controller import BoxBase
from corral.sandbox._messages import LOST_NOTE, is_lock_timeout, lock_contention, refused
from corral.sandbox._plan import AppState, EmulatedServerError, Plan
from corral.sandbox._targets import Target, target

__all__ = [
    "PsycopgBoxBase",
    "PsycopgLockTimeout",
    "SandboxCursors",
    "app_status",
    "emulated",
    "factory_target",
    "lost_note",
    "pool_target",
    "query_text",
    "refused",
    "translate",
]

logger = logging.getLogger("corral.sandbox.psycopg")


class PsycopgLockTimeout(SandboxLockTimeout, pgerrors.LockNotAvailable):
    """Lock contention in a sandbox; still a ``psycopg.errors.LockNotAvailable``."""

    def __init__(self, message: str, original: psycopg.Error) -> None:
        SandboxLockTimeout.__init__(self, message)
        pgerrors.LockNotAvailable.__init__(self, message, info=original.pgresult)


def query_text(query: Any, context: Any) -> str | None:
    """The SQL text of *query* for classification; None when it cannot be known."""
    if isinstance(query, str):
        return query
    if isinstance(query, bytes | bytearray | memoryview):
        return bytes(query).decode("utf-8", "replace")
    if isinstance(query, sql.Composable):
        return query.as_string(context)
    return None


def translate(exc: psycopg.Error, text: str | None, lock_timeout: float | None) -> psycopg.Error:
    """Map a server error to what the sandbox reports (the same object when unchanged)."""
    if is_lock_timeout(exc.sqlstate, exc.diag.source_function):
        return PsycopgLockTimeout(lock_contention(lock_timeout, exc.diag.context, text), exc)
    return exc


def emulated(err: EmulatedServerError) -> psycopg.Error:
    """The psycopg exception production would raise for the server's answer."""
    cls = pgerrors.lookup(err.sqlstate)
    exc: psycopg.Error = cls(str(err))
    return exc


def app_status(app: AppState, real: TransactionStatus) -> TransactionStatus:
    """The transaction status production would show the application."""
    if real in (TransactionStatus.ACTIVE, TransactionStatus.UNKNOWN):
        return real
    if not app.frames:
        return TransactionStatus.IDLE
    return (
        TransactionStatus.INERROR
        if real == TransactionStatus.INERROR
        else TransactionStatus.INTRANS
    )


def lost_note() -> str:
    return LOST_NOTE


C = TypeVar("C", "psycopg.Connection[Any]", "psycopg.AsyncConnection[Any]")

#: Cursors a controller keeps; past this many (its connections came and went) it
#: drops them all rather than track which connections are gone.
_KEPT_CURSORS = 8


class SandboxCursors:
    """The cursor each real connection's sandboxes send their own SQL through.

    One per connection, made at its first sandbox and reused by the next ones (making
    a cursor costs about as much as a round trip's Python). Keyed by the connection's
    id and checked by identity, so a new connection at a recycled address gets its own.
    """

    def __init__(self) -> None:
        self._by_conn: dict[int, Any] = {}

    def get(self, real: Any) -> Any:
        """The sandbox cursor of *real* (a ``tuple_row`` cursor, sync or async)."""
        cur = self._by_conn.get(id(real))
        if cur is None or cur.connection is not real or cur.closed:
            if len(self._by_conn) >= _KEPT_CURSORS:
                self._by_conn.clear()
            cur = self._by_conn[id(real)] = real.cursor(row_factory=tuple_row)
        return cur


class PsycopgBoxBase(BoxBase, Generic[C]):
    """One open sandbox on a psycopg connection *C* (sync or async): what needs no I/O."""

    def __init__(self, plan: Plan, real: C) -> None:
        super().__init__(plan)
        self.real: C = real
        self.app_autocommit: bool = real.autocommit
        self.app_row_factory: Any = real.row_factory

    def note(self, exc: BaseException) -> None:
        """Mark the box broken if *exc* came with the loss of its connection."""
        if self.broken is None and (self.real.closed or self.real.broken):
            self.broken = exc
            exc.add_note(lost_note())

    def real_status(self) -> TransactionStatus:
        """The real connection's transaction status (UNKNOWN once lost or closed)."""
        if self.broken is not None or self.real.closed:
            return TransactionStatus.UNKNOWN
        status: TransactionStatus = self.real.info.transaction_status
        return status


def pool_target(pool: Any) -> Target | None:
    """The database a ``psycopg_pool`` pool connects to (its conninfo and kwargs)."""
    conninfo = getattr(pool, "conninfo", None)
    if not isinstance(conninfo, str):
        return None
    return target(conninfo, getattr(pool, "kwargs", None))


def factory_target(factory: Any) -> Target | None:
    """The database a conninfo string reaches; None for a function (opaque)."""
    return target(factory) if isinstance(factory, str) else None
