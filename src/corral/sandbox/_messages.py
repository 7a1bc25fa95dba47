"""Driver-neutral error messages of the sandbox adapters (one wording for every driver).

Adapters wrap these texts in their driver's exception classes, so the application's own
handlers (``except psycopg.errors.LockNotAvailable``, ``except asyncpg.LockNotAvailableError``)
keep working while the message says what happened and what to do.
"""

from __future__ import annotations

from corral.errors import UnsupportedStatement
from corral.sandbox._statements import Statement

__all__ = ["LOST_NOTE", "is_lock_timeout", "lock_contention", "refused", "short"]

#: SQLSTATE lock_not_available: a lock wait ran out (lock_timeout), or NOWAIT found the
#: lock taken.
LOCK_NOT_AVAILABLE = "55P03"
#: The server function that raises it when lock_timeout runs out (NOWAIT's come from the
#: lock manager). A name in the server's source, not a message: the same whatever
#: language ``lc_messages`` makes the messages.
_LOCK_TIMEOUT_SOURCE = "ProcessInterrupts"

LOST_NOTE = (
    "corral: the sandbox's connection was lost (was its backend terminated?). "
    "Everything this test wrote is gone; the sandbox is unusable and the next sandbox "
    "gets a fresh connection."
)


def short(text: str, limit: int = 200) -> str:
    """*text* on one line, cut to *limit* characters."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def refused(stmt: Statement) -> UnsupportedStatement:
    """The error for a statement PostgreSQL refuses inside a transaction block."""
    return UnsupportedStatement(
        f"{stmt.command} cannot run inside the sandbox: PostgreSQL refuses it inside a "
        "transaction block, and everything in a sandbox runs in one never-committed "
        "transaction. Run this test outside the sandbox: mark it "
        "@pytest.mark.no_sandbox (the corral plugin gives it a fresh database), or use "
        f'sandbox(..., mode="normal") for it. Statement: {short(stmt.text)}',
        statement=stmt.command,
    )


def is_lock_timeout(sqlstate: str | None, source_function: str | None) -> bool:
    """Whether a server error is a lock wait that ran out of ``lock_timeout``.

    :param source_function: the error's source function field (psycopg's
        ``diag.source_function``, asyncpg's ``server_source_function``); a server that
        does not send it (None) is taken at its SQLSTATE's word.
    """
    return sqlstate == LOCK_NOT_AVAILABLE and source_function in (None, _LOCK_TIMEOUT_SOURCE)


def lock_contention(lock_timeout: float | None, context: str | None, text: str | None) -> str:
    """The message of a lock timeout inside a sandbox (contention with another test)."""
    context = (context or "").strip()
    where = f" ({context})" if context else ""
    waited = f"{lock_timeout:g} s" if lock_timeout is not None else "lock_timeout"
    return (
        f"lock contention: the statement waited {waited} for a lock{where} held by "
        "another transaction - most likely a concurrent sandbox (another test) that "
        "wrote the same unique key or locked the same rows, and never commits. Give "
        "each test its own keys (e.g. from a sequence or the worker id), or run these "
        "tests serially; raise lock_timeout if the wait was legitimate. Statement: "
        f"{short(text or '?')}"
    )
