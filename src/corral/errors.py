"""The one exception tree of corral; foreign exceptions are mapped to it at the edges.

::

    CorralError
    ├── BrokerError                      anything the broker or a client reports
    │   ├── BrokerUnavailable            (ConnectionError) no broker at the path, or it went away
    │   ├── BrokerAlreadyRunning         (FileExistsError) a live broker answers at that path
    │   ├── BrokerTimeout                (TimeoutError) a wait or a request ran out of time
    │   ├── ProtocolError                a peer sent something that is not the protocol
    │   └── BrokerRequestError           the broker answered {"ok": false, "error": CODE}
    │       ├── KeyNotFound              (KeyError) not_found / expired; ``.expired`` tells which
    │       ├── TTLRequired              (ValueError) ttl_required
    │       ├── InvalidTTL               (ValueError) invalid_ttl
    │       ├── TooLarge                 (ValueError) too_large
    │       ├── CapacityExceeded         max_items (also when max_bytes is reached)
    │       ├── LeaseError               key_and_worker_required, worker_required,
    │       │                            worker_already_has_lease
    │       ├── AuthFailed               (PermissionError) auth_failed
    │       ├── InvalidRequest           (ValueError) invalid_json, unknown_action, bad_request
    │       ├── InvalidValue             (ValueError) invalid_value: a number JSON cannot carry
    │       ├── CounterOverflow          (OverflowError) overflow: outside the signed 64-bit range
    │       ├── WaitTimeout              (BrokerTimeout) timeout: the broker gave up a wait
    │       ├── Draining                 (ConnectionError) the broker is shutting down
    │       ├── OnceFailed               once_failed: the one compute() of once() raised
    │       ├── BarrierBroken            barrier_broken: a member died or timed out
    │       ├── PoolConflict             (ValueError) pool_conflict: redeclared with other items
    │       └── ClaimLost                claim_lost: a lock/pool item was freed under its holder
    ├── SandboxError                     a statement or state the sandbox cannot honour
    │   ├── SandboxNotActive             a query in sandbox mode from a context without a sandbox
    │   ├── UnsupportedStatement         VACUUM, CREATE DATABASE, ... refused in a transaction
    │   ├── SandboxLockTimeout           (TimeoutError) lock contention between sandboxes
    │   ├── SandboxBusy                  (TimeoutError) the sandbox connection stayed in use
    │   └── SandboxBroken                (ConnectionError) the sandbox's connection died
    └── PostgresError                    the throwaway PostgreSQL or a template database
        ├── PostgresNotFound             (FileNotFoundError) no PostgreSQL binaries on the machine
        ├── PostgresStartError           the server did not start; carries its log
        ├── PostgresDriverMissing        (ImportError) SQL work needs psycopg or asyncpg
        ├── AdminError                   an admin statement (CREATE/DROP DATABASE...) failed
        ├── TemplateBuildError           the schema failed to build; nothing is left behind
        │   └── EmptyTemplate            the schema step ran but created nothing in the template
        └── DatabaseInUse                (TimeoutError) other sessions kept a database busy

Each wire error code maps to exactly one class through :data:`ERROR_CODES`; use
:func:`error_from_code` to build the exception for a ``{"ok": false}`` answer.
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """Base class of every exception corral raises on purpose."""


# --------------------------------------------------------------------------- broker


class BrokerError(CorralError):
    """Something went wrong talking to the broker."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """No broker answers at the path, or the connection to it broke."""


class BrokerAlreadyRunning(BrokerError, FileExistsError):
    """A live broker already answers at the socket path; it is never unlinked."""


class BrokerTimeout(BrokerError, TimeoutError):
    """A request or a wait (lock, acquire, once, ...) did not finish in time."""


class ProtocolError(BrokerError):
    """A peer sent bytes that are not the broker protocol."""


class BrokerRequestError(BrokerError):
    """The broker refused a request: ``{"ok": false, "error": code}``.

    :ivar code: the wire error code.
    :ivar key: the key or name the request was about, when there was one.
    """

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.key = key

    def __str__(self) -> str:
        # KeyError's __str__ would repr() the message; keep it readable for every subclass.
        return str(self.args[0]) if self.args else self.code


class KeyNotFound(BrokerRequestError, KeyError):
    """The key does not exist; ``expired`` is True when it existed but its TTL passed."""

    code = "not_found"

    @property
    def expired(self) -> bool:
        return self.code == "expired"


class TTLRequired(BrokerRequestError, ValueError):
    """The broker requires a TTL on every key and none was given."""

    code = "ttl_required"


class InvalidTTL(BrokerRequestError, ValueError):
    """The TTL is negative, not a number, or zero where TTLs are required."""

    code = "invalid_ttl"


class TooLarge(BrokerRequestError, ValueError):
    """A value or a whole request is over the broker's size limit."""

    code = "too_large"


class CapacityExceeded(BrokerRequestError):
    """The broker is full: ``max_items`` things (keys, pools, queued items, locks, barriers,
    compute claims) or ``max_bytes`` of them; updates of existing keys still work."""

    code = "max_items"


class LeaseError(BrokerRequestError):
    """A lease request was malformed, or the worker already leases under another key."""

    code = "lease_error"


class AuthFailed(BrokerRequestError, PermissionError):
    """The secret is missing or wrong."""

    code = "auth_failed"


class InvalidRequest(BrokerRequestError, ValueError):
    """The request was not valid JSON, named an unknown action, or had malformed fields."""

    code = "bad_request"


class InvalidValue(BrokerRequestError, ValueError):
    """A request carried a number the broker could not send back (NaN, Infinity, 1e400).

    The detail names where it is, e.g. ``number out of range at value.a[2]: 1e400``.
    """

    code = "invalid_value"


class CounterOverflow(BrokerRequestError, OverflowError):
    """``incr`` would leave the signed 64-bit range (as Redis ``INCRBY``); the key is unchanged."""

    code = "overflow"


class Draining(BrokerRequestError, ConnectionError):
    """The broker is shutting down and takes no new requests."""

    code = "draining"


class WaitTimeout(BrokerRequestError, BrokerTimeout):
    """The broker gave up a wait (lock, acquire, ...) after the request's timeout."""

    code = "timeout"


# ------------------------------------------------- coordination (issue 5; both backends)


class OnceFailed(BrokerRequestError):
    """The one ``compute()`` of ``once(key, ...)`` raised; every caller gets this error.

    The computing caller itself gets its original exception; the others get this one,
    carrying the original message, so a failing setup fails once, not N times.

    :ivar message: the original exception's ``str()``.
    :ivar error_type: the original exception's class name, e.g. ``"RuntimeError"``.
    """

    code = "once_failed"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        key: str | None = None,
        original: str = "",
        error_type: str = "",
    ) -> None:
        super().__init__(message, code=code, key=key)
        self.message = original
        self.error_type = error_type


class BarrierBroken(BrokerRequestError):
    """A barrier cannot complete: a member died or timed out while the others waited.

    The barrier stays broken for the rest of the run, like :class:`threading.Barrier`.

    :ivar reason: what broke it, e.g. ``"member pid 123 on host-a died"``.
    """

    code = "barrier_broken"

    def __init__(
        self, message: str, *, code: str | None = None, key: str | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, code=code, key=key)
        self.reason = reason


class PoolConflict(BrokerRequestError, ValueError):
    """A pool was redeclared with different items (declaring it again identically is fine)."""

    code = "pool_conflict"


class ClaimLost(BrokerRequestError):
    """A lock or pool item was no longer held when released: its TTL passed or its
    holder's session expired (e.g. the process was paused), so another holder may have
    run concurrently. The fencing token tells writers which holder is current."""

    code = "claim_lost"


_HINTS: dict[str, str] = {
    "not_found": "the key was never set (or was deleted)",
    "expired": "the key existed but its TTL passed",
    "ttl_required": "this broker requires a TTL: pass ttl=SECONDS",
    "invalid_ttl": "a TTL must be a positive number of seconds",
    "too_large": "the value or request is over the broker's size limit",
    "max_items": "the broker is full (max_items or max_bytes); free things or raise the limit",
    "key_and_worker_required": "lease needs both a key and a worker id",
    "worker_required": "release needs a worker id",
    "worker_already_has_lease": "this worker already holds a lease under another key",
    "auth_failed": "the secret is missing or wrong (check EPHEMERAL_SECRET)",
    "invalid_json": "the request was not one JSON object per line",
    "unknown_action": "the broker does not know this action",
    "bad_request": "the request has missing or malformed fields",
    "invalid_value": "a number is NaN, infinite or beyond a 64-bit float; send finite numbers",
    "overflow": "a counter must stay within the signed 64-bit range (-2**63 .. 2**63-1)",
    "draining": "the broker is shutting down",
    "timeout": "the wait timed out on the broker",
    "once_failed": "the one compute() of once() raised; fix it and start a new run",
    "barrier_broken": "a barrier member died or timed out, so the barrier cannot complete",
    "pool_conflict": "the pool was declared before with different items",
    "claim_lost": "the claim was freed (TTL or session expiry) before it was released",
    "internal_error": "the broker failed on this request (a bug: please report it)",
}

#: wire error code -> exception class. One table, so mapping is never scattered.
ERROR_CODES: dict[str, type[BrokerRequestError]] = {
    "not_found": KeyNotFound,
    "expired": KeyNotFound,
    "ttl_required": TTLRequired,
    "invalid_ttl": InvalidTTL,
    "too_large": TooLarge,
    "max_items": CapacityExceeded,
    "key_and_worker_required": LeaseError,
    "worker_required": LeaseError,
    "worker_already_has_lease": LeaseError,
    "auth_failed": AuthFailed,
    "invalid_json": InvalidRequest,
    "unknown_action": InvalidRequest,
    "bad_request": InvalidRequest,
    "invalid_value": InvalidValue,
    "overflow": CounterOverflow,
    "draining": Draining,
    "timeout": WaitTimeout,
    "internal_error": BrokerRequestError,
    "once_failed": OnceFailed,
    "barrier_broken": BarrierBroken,
    "pool_conflict": PoolConflict,
    "claim_lost": ClaimLost,
}


def error_from_code(
    code: str, *, key: str | None = None, detail: str | None = None, **_: Any
) -> BrokerRequestError:
    """Build the exception for a broker's ``{"ok": false, "error": code}`` answer."""
    cls = ERROR_CODES.get(code, BrokerRequestError)
    hint = _HINTS.get(code, "the broker refused the request")
    where = f" (key {key!r})" if key is not None else ""
    extra = f": {detail}" if detail else ""
    return cls(f"{code}: {hint}{where}{extra}", code=code, key=key)


# --------------------------------------------------------------------------- sandbox


class SandboxError(CorralError):
    """The sandbox cannot run this statement or is in a state that cannot serve it."""


class SandboxNotActive(SandboxError):
    """A query in sandbox mode came from a context that has no sandbox (never a silent commit)."""


class UnsupportedStatement(SandboxError):
    """PostgreSQL refuses this statement inside a transaction block (VACUUM, CREATE DATABASE...).

    :ivar statement: the statement's leading command, e.g. ``"CREATE INDEX CONCURRENTLY"``.
    """

    def __init__(self, message: str, *, statement: str) -> None:
        super().__init__(message)
        self.statement = statement


class SandboxLockTimeout(SandboxError, TimeoutError):
    """A statement waited ``lock_timeout`` for a lock another sandbox holds (contention).

    The psycopg adapter raises a subclass that is also ``psycopg.errors.LockNotAvailable``,
    so application code that handles lock timeouts keeps working.
    """


class SandboxBusy(SandboxError, TimeoutError):
    """The sandbox's connection stayed checked out by another task or thread too long."""


class SandboxBroken(SandboxError, ConnectionError):
    """The sandbox's connection died (e.g. ``pg_terminate_backend``); open a new sandbox."""


# --------------------------------------------------------------------------- postgres


class PostgresError(CorralError):
    """The throwaway PostgreSQL server or a template database failed."""


class PostgresNotFound(PostgresError, FileNotFoundError):
    """No PostgreSQL server binaries were found on the machine."""


class PostgresStartError(PostgresError):
    """The server did not start; the message carries the tail of its log.

    :ivar log: the whole server log as text ('' when there was none).
    :ivar log_path: where the log was written, when it was kept.
    """

    def __init__(self, message: str, *, log: str = "", log_path: str | None = None) -> None:
        super().__init__(message)
        self.log = log
        self.log_path = log_path


class PostgresDriverMissing(PostgresError, ImportError):
    """SQL work (templates, clones) needs psycopg 3 or asyncpg: ``pip install 'corral[psycopg]'``
    or ``'corral[asyncpg]'``."""


class AdminError(PostgresError):
    """A statement of corral's own database work (templates, clones, drops) failed.

    The driver's error (psycopg's or asyncpg's) is ``__cause__``.

    :ivar sqlstate: PostgreSQL's error code, e.g. ``"55006"`` (object in use).
    :ivar kind: the driver's error class name, e.g. ``"UndefinedTable"``.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc).strip())
        self.sqlstate: str | None = getattr(exc, "sqlstate", None)
        self.kind = type(exc).__name__


class TemplateBuildError(PostgresError):
    """Building a template database from the schema failed; the half-built database was dropped.

    The original error is ``__cause__``.

    :ivar template: the template database's name.
    :ivar source: the schema file or callable that failed.
    """

    def __init__(self, message: str, *, template: str, source: str) -> None:
        super().__init__(message)
        self.template = template
        self.source = source


class EmptyTemplate(TemplateBuildError):
    """The schema step succeeded but created nothing (no table, view, sequence, function,
    type, schema or extension) in the template, which was dropped.

    Typically a migration environment (Alembic's ``env.py``) that read its URL from the
    application's settings and migrated another database.
    """


class DatabaseInUse(PostgresError, TimeoutError):
    """Other sessions kept using a database that had to be cloned or dropped.

    :ivar database: the database's name.
    """

    def __init__(self, message: str, *, database: str) -> None:
        super().__init__(message)
        self.database = database
