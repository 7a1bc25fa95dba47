"""What the sync and async psycopg adapters share: query text, error mapping, the
transaction status the application sees. No I/O here.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.pq import TransactionStatus

from corral.errors import SandboxLockTimeout, UnsupportedStatement
from corral.sandbox._plan import AppState, EmulatedServerError, Statement

__all__ = [
    "PsycopgLockTimeout",
    "app_status",
    "emulated",
    "lost_note",
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


def _short(text: str, limit: int = 200) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def translate(exc: psycopg.Error, text: str | None, lock_timeout: float | None) -> psycopg.Error:
    """Map a server error to what the sandbox reports (the same object when unchanged)."""
    if isinstance(exc, pgerrors.LockNotAvailable) and "lock timeout" in str(exc):
        context = (exc.diag.context or "").strip()
        where = f" ({context})" if context else ""
        waited = f"{lock_timeout:g} s" if lock_timeout is not None else "lock_timeout"
        return PsycopgLockTimeout(
            f"lock contention: the statement waited {waited} for a lock{where} held by "
            "another transaction - most likely a concurrent sandbox (another test) that "
            "wrote the same unique key or locked the same rows, and never commits. Give "
            "each test its own keys (e.g. from a sequence or the worker id), or run these "
            "tests serially; raise lock_timeout if the wait was legitimate. Statement: "
            f"{_short(text or '?')}",
            exc,
        )
    return exc


def refused(stmt: Statement) -> UnsupportedStatement:
    return UnsupportedStatement(
        f"{stmt.command} cannot run inside the sandbox: PostgreSQL refuses it inside a "
        "transaction block, and everything in a sandbox runs in one never-committed "
        "transaction. Run this test outside the sandbox: mark it "
        "@pytest.mark.no_sandbox (the corral plugin gives it a fresh database), or use "
        f'sandbox(..., mode="normal") for it. Statement: {_short(stmt.text)}',
        statement=stmt.command,
    )


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
    return (
        "corral: the sandbox's connection was lost (was its backend terminated?). "
        "Everything this test wrote is gone; the sandbox is unusable and the next sandbox "
        "gets a fresh connection."
    )
