"""The driver-agnostic savepoint plan of one sandbox connection: which SQL to send when.

A :class:`Plan` turns sandbox and application events (open, nest, restore, the app's
BEGIN/COMMIT/ROLLBACK, each statement) into SQL text and keeps the one stack of
savepoints the connection really has. It does no I/O: a driver adapter sends each
:class:`Step` and reports back. Modelled on psycopg's ``BaseTransaction``.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

from corral.errors import SandboxError
from corral.sandbox._statements import (
    Kind,
    Statement,
    classify,
    classify_script,
    mentions_advisory_locks,
    split,
)

__all__ = [
    "AppState",
    "EmulatedServerError",
    "Frame",
    "FrameKind",
    "Kind",
    "Plan",
    "Statement",
    "Step",
    "classify",
    "classify_script",
    "quote_ident",
    "split",
]

#: Asks the server whether any deferrable constraint (FK, unique, exclusion, constraint
#: trigger) exists; without one, the deferred-constraint check at commit is skipped.
DEFERRABLE_QUERY = "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgdeferrable)"

#: Session-level advisory locks survive ROLLBACK (and ROLLBACK TO): sent after the
#: rollback of a sandbox level whose SQL named advisory locks, in the same round trip.
UNLOCK_ADVISORY = "; SELECT pg_catalog.pg_advisory_unlock_all()"


class FrameKind(enum.Enum):
    SANDBOX = "sandbox"  #: a sandbox level (the outer transaction, or a nested sandbox)
    TRANSACTION = "transaction"  #: an application transaction (explicit or implicit)
    NESTED = "nested"  #: an application transaction block inside another one
    USER = "user"  #: a SAVEPOINT the application wrote itself
    STATEMENT = "statement"  #: one autocommit statement


@dataclass(eq=False)
class Frame:
    """One savepoint on the connection's stack."""

    kind: FrameKind
    name: str  #: as sent (quoted when needed); "" for the outer transaction itself
    app: AppState | None = None
    #: the name the app knows it by (folded, unquoted): its USER savepoints and the
    #: blocks it named; None for names the sandbox made up, which the app cannot use
    key: str | None = None
    read_only: bool = False
    #: SANDBOX: SQL run in this level named advisory locks (freed when it rolls back)
    advisory: bool = False


@dataclass(eq=False)
class AppState:
    """What one application connection (one checkout) believes about its transaction.

    :ivar autocommit: the app's autocommit setting (production semantics per statement).
    :ivar read_only: the app's ``read_only`` default for the transactions it begins.
    :ivar frames: this app's open frames, outermost first; empty means "idle".
    :ivar lost: why the app's open transaction no longer exists, when it does not.
    :ivar wrote: its open transaction may have written (kept by the sandbox's turns).
    """

    autocommit: bool = False
    read_only: bool | None = None
    frames: list[Frame] = field(default_factory=list)
    lost: str | None = None
    wrote: bool = False

    @property
    def in_transaction(self) -> bool:
        return bool(self.frames)


class Step(NamedTuple):
    """SQL to send; if it fails, send *undo* (when given) and raise the error to the app.

    What a step does is said here as data, so that no adapter reads it from the SQL text.
    """

    sql: str
    undo: str | None = None
    #: it ends with a ROLLBACK (TO SAVEPOINT): once it ran, the transaction is no longer
    #: failed (for drivers that do not report that state, asyncpg's)
    rolls_back: bool = False
    #: a query whose one value the plan wants back after *sql* (:meth:`Plan.opened`)
    ask: str | None = None

    @property
    def script(self) -> str:
        """*sql* then *ask* in one text, for drivers that read a script's last result."""
        return f"{self.sql}; {self.ask}" if self.ask else self.sql


class EmulatedServerError(Exception):
    """What the server would have answered in production (the adapter maps *sqlstate*)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def quote_ident(name: str) -> str:
    """Quote *name* as a PostgreSQL identifier (always quoted: exact, never folded)."""
    return '"' + name.replace('"', '""') + '"'


@functools.lru_cache(maxsize=8)
def _lock_timeout_sql(seconds: float) -> str:
    """The setting that bounds lock waits, as sent after BEGIN (one text per handle)."""
    return f"SET LOCAL lock_timeout = {max(1, round(seconds * 1000))}; "


def _dollar_quoted(text: str, tag: str) -> str:
    while f"${tag}$" in text:
        tag += "_"
    return f"${tag}${text}${tag}$"


def _raise_sql(sqlstate: str, message: str) -> str:
    """A statement that fails on the server with *sqlstate* and *message*, aborting the
    transaction as the statement it stands for would in production."""
    body = (
        f"BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', "
        f"MESSAGE = {_dollar_quoted(message, 'msg')}; END"
    )
    return f"DO {_dollar_quoted(body, 'corral')}"


def _unquoted(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _release(f: Frame) -> str:
    return f"RELEASE SAVEPOINT {f.name}"


def _rollback_to(f: Frame) -> str:
    return f"ROLLBACK TO SAVEPOINT {f.name}; RELEASE SAVEPOINT {f.name}"


class Plan:
    """Savepoint bookkeeping of one sandbox connection.

    :param lock_timeout: seconds a statement waits for a lock before failing (``SET
        LOCAL lock_timeout``), None to leave the server's setting.
    :param isolation_level: isolation level of the sandbox's outer transaction, e.g.
        ``"REPEATABLE READ"``; None for the server default.
    :param check_deferred: check deferred constraints at each application commit, as
        production would. None (default) checks only when a deferrable constraint
        exists (see *deferrable_exists*; and after DDL that mentions DEFERRABLE).
    :param deferrable_exists: whether the database has deferrable constraints, when
        known; None makes :meth:`open` ask the server.
    """

    def __init__(
        self,
        *,
        lock_timeout: float | None = 5.0,
        isolation_level: str | None = None,
        check_deferred: bool | None = None,
        deferrable_exists: bool | None = None,
    ) -> None:
        self.lock_timeout = lock_timeout
        self.isolation_level = isolation_level
        self.check_deferred = check_deferred
        self.stack: list[Frame] = []
        self.pending: Frame | None = None  # an autocommit statement's savepoint, not yet released
        #: the server's answer to DEFERRABLE_QUERY; given by the caller when it already
        #: asked for an earlier sandbox on the same database (saves a catalog query per test)
        self.deferrable_exists = deferrable_exists
        self._setup = ""
        if check_deferred is None:
            self.deferred_possible = bool(deferrable_exists)
        else:
            self.deferred_possible = check_deferred
        self._counter = 0

    # ------------------------------------------------------------------ sandbox levels

    @property
    def depth(self) -> int:
        """Number of open sandbox levels (0: closed)."""
        if len(self.stack) < 2:  # closed, or just the outer transaction (a sandbox level)
            return len(self.stack)
        return sum(1 for f in self.stack if f.kind is FrameKind.SANDBOX)

    def _begin_sql(self) -> str:
        sql = "BEGIN"
        if self.isolation_level:
            sql += f" ISOLATION LEVEL {self.isolation_level}"
        if self.lock_timeout is not None:
            # Sent with the first SQL the plan emits after BEGIN, always before any
            # savepoint (so no ROLLBACK TO can undo it): a test that runs no statement
            # pays nothing, the others pay no extra round trip.
            self._setup = _lock_timeout_sql(self.lock_timeout)
        return sql

    @property
    def asks_deferrable(self) -> bool:
        """Whether :meth:`open`'s step asks :data:`DEFERRABLE_QUERY` (its ``ask``)."""
        return self.check_deferred is None and self.deferrable_exists is None

    def open(self) -> Step:
        """Open the outer transaction; afterwards call :meth:`opened`."""
        if self.stack:
            raise SandboxError("this sandbox connection is already open")
        self.stack.append(Frame(FrameKind.SANDBOX, ""))
        ask = DEFERRABLE_QUERY if self.asks_deferrable else None
        return Step(self._begin_sql(), "ROLLBACK", ask=ask)

    def opened(self, deferrable_exists: bool) -> None:
        """Record the server's answer to :data:`DEFERRABLE_QUERY`."""
        self.deferrable_exists = deferrable_exists
        if self.check_deferred is None:
            self.deferred_possible = self.deferred_possible or deferrable_exists

    def push_sandbox(self) -> Step:
        """Open a nested sandbox level (a savepoint)."""
        if not self.stack:
            raise SandboxError("no open sandbox to nest in")
        frame = Frame(FrameKind.SANDBOX, self._name("corral_sandbox"))
        sql = self._flush() + f"SAVEPOINT {frame.name}"
        self.stack.append(frame)
        return Step(sql)

    def pop_sandbox(self) -> Step:
        """Close the innermost nested sandbox level: roll back everything done in it."""
        frame = self._innermost_sandbox()
        if frame.name == "":
            return Step(self.close(), rolls_back=True)
        # Quietly: an app transaction left open in the level (a session of a wider-scoped
        # fixture, used by the test) ends with it; its next statement begins a new one.
        self._discard_from(frame, reason="", quiet=True)
        return Step(_rollback_to(frame) + self._unlock(frame), rolls_back=True)

    def restore(self) -> Step:
        """Roll back to the start of the innermost sandbox level and keep it open."""
        frame = self._innermost_sandbox()
        self._discard_from(frame, reason="the sandbox was restored", keep=True)
        unlock = self._unlock(frame)
        if frame.name == "":
            # Rolling the whole transaction back and beginning again is as cheap as a
            # savepoint and refreshes now() for the next test.
            return Step("ROLLBACK" + unlock + "; " + self._begin_sql(), rolls_back=True)
        return Step(f"ROLLBACK TO SAVEPOINT {frame.name}" + unlock, rolls_back=True)

    def close(self) -> str:
        """Roll the whole sandbox back (the connection may then go back to its pool)."""
        unlock = any(f.advisory for f in self.stack)
        for f in self.stack:
            if f.app is not None and f.app.frames:
                f.app.frames.clear()
                f.app.lost = "the sandbox it ran in was closed"
        self.stack.clear()
        self.pending = None
        return "ROLLBACK" + UNLOCK_ADVISORY if unlock else "ROLLBACK"

    def note_sql(self, sql: str) -> None:
        """See the text of an app statement before it runs: SQL that names advisory
        locks makes the rollback of this sandbox level free the session's ones.

        Only SQL text is seen: a lock taken inside a server-side function whose call
        does not name it stays held, as it would on a pooled connection in production.
        """
        if self.stack and mentions_advisory_locks(sql):
            self._innermost_sandbox().advisory = True

    def _unlock(self, frame: Frame) -> str:
        """SQL freeing session advisory locks after *frame*'s level rolled back, if it
        took any. All of the session's go (PostgreSQL has no finer call), so an outer
        level's too: rare, and better than a lock leaking into the next test."""
        if not frame.advisory:
            return ""
        for f in self.stack:
            f.advisory = False
        frame.advisory = False
        return UNLOCK_ADVISORY

    def _innermost_sandbox(self) -> Frame:
        for f in reversed(self.stack):
            if f.kind is FrameKind.SANDBOX:
                return f
        raise SandboxError("this sandbox is not open")

    # ------------------------------------------------------------------ bookkeeping

    def _name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def _flush(self) -> str:
        """SQL owed to the server (the sandbox's settings, the release of a lazily kept
        statement savepoint), to prefix any other SQL the plan emits."""
        setup, self._setup = self._setup, ""
        f = self.pending
        if f is None:
            return setup
        self.pending = None
        if self.stack and self.stack[-1] is f:
            self.stack.pop()
        return setup + _release(f) + "; "

    def _push(self, frame: Frame) -> str:
        sql = self._flush() + f"SAVEPOINT {frame.name}"
        self.stack.append(frame)
        if frame.app is not None:
            frame.app.frames.append(frame)
        return sql

    def _discard_from(
        self,
        frame: Frame,
        *,
        reason: str,
        keep: bool = False,
        actor: AppState | None = None,
        quiet: bool = False,
    ) -> None:
        """Pop *frame* (unless *keep*) and every frame above it after a ROLLBACK TO.

        Other apps whose frames are rolled back this way lost their work: they are told
        so at their next use rather than silently carrying on in a transaction that is gone
        (unless *quiet*: a sandbox level ended, taking its data with it by design).
        """
        if self.pending is not None and self.pending in self.stack:
            self.pending = None
        i = self.stack.index(frame)
        cut = i + 1 if keep else i
        for f in self.stack[cut:]:
            a = f.app
            if a is not None and f in a.frames:
                del a.frames[a.frames.index(f) :]
                if quiet:
                    a.wrote = a.wrote and bool(a.frames)
                elif a is not actor and f.kind is not FrameKind.STATEMENT:
                    a.lost = a.lost or reason
        del self.stack[cut:]

    def _merge_from(self, frame: Frame) -> None:
        """Pop *frame* and every frame above it after a RELEASE: their work is kept."""
        if self.pending is not None and self.pending in self.stack:
            self.pending = None
        i = self.stack.index(frame)
        for f in self.stack[i:]:
            if f.app is not None and f in f.app.frames:
                del f.app.frames[f.app.frames.index(f) :]
        del self.stack[i:]

    def _check_deferred(self) -> str:
        if not self.deferred_possible:
            return ""
        # SET CONSTRAINTS ALL IMMEDIATE fires the pending deferred checks now, as COMMIT
        # would; rolling the check's savepoint back restores each constraint's mode and
        # re-arms its events (PostgreSQL un-marks events fired in an aborted subxact).
        return (
            "SAVEPOINT corral_check; SET CONSTRAINTS ALL IMMEDIATE; "
            "ROLLBACK TO SAVEPOINT corral_check; RELEASE SAVEPOINT corral_check; "
        )

    def note_ddl(self, stmt: Statement) -> None:
        """Learn from DDL: a new deferrable constraint turns the commit check on."""
        if self.check_deferred is None and not self.deferred_possible:
            upper = stmt.text.upper()
            if "DEFERRABLE" in upper or "CONSTRAINT TRIGGER" in upper:
                self.deferred_possible = True

    # ------------------------------------------------------------------ app statements

    def _usable(self, app: AppState) -> None:
        if app.lost is not None:
            reason, app.lost = app.lost, None
            raise SandboxError(
                f"this connection's transaction no longer exists: {reason}. In production "
                "it would still be open; end it (rollback) before the sandbox is closed, "
                "restored, or rolled back past it."
            )
        if not self.stack:
            raise SandboxError("the sandbox this connection belongs to is closed")

    def before_statement(self, app: AppState) -> Step | None:
        """Before one application statement: open what production would have open."""
        self._usable(app)
        if app.frames:
            owed = self._flush()
            return Step(owed.rstrip("; ")) if owed else None
        if app.autocommit:
            return Step(self._push(Frame(FrameKind.STATEMENT, "corral_stmt", app)))
        return self._begin_tx(app, None)

    def after_statement(self, app: AppState) -> Step | None:
        """After it succeeded. An autocommit statement commits (to the sandbox) here."""
        if not (app.frames and app.frames[-1].kind is FrameKind.STATEMENT):
            return None
        frame = app.frames.pop()
        check = self._check_deferred()
        if not check:
            self.pending = frame  # released lazily, in the next round trip
            return None
        self.stack.remove(frame)
        return Step(check + _release(frame), _rollback_to(frame))

    def statement_failed(self, app: AppState) -> Step | None:
        """After it failed. An autocommit statement rolls back to its own savepoint."""
        if app.frames and app.frames[-1].kind is FrameKind.STATEMENT:
            frame = app.frames[-1]
            self._discard_from(frame, reason="its statement failed", actor=app)
            return Step(_rollback_to(frame), rolls_back=True)
        return None

    # ------------------------------------------------------------------ app transactions

    def _begin_tx(self, app: AppState, name: str | None, *, read_only: bool | None = None) -> Step:
        ro = app.read_only if read_only is None else read_only
        frame = Frame(
            FrameKind.TRANSACTION, name or self._name("corral_tx"), app, read_only=bool(ro)
        )
        sql = self._push(frame)
        if frame.read_only:
            sql += "; SET TRANSACTION READ ONLY"
        return Step(sql)

    def begin(self, app: AppState, stmt: Statement | None = None) -> Step | None:
        """The app's BEGIN / START TRANSACTION (a no-op, as in production, when in one)."""
        self._usable(app)
        if app.frames:
            # The server answers as production's would: a warning, or in a failed
            # transaction 25P02.
            return Step(stmt.text) if stmt is not None else None
        return self._begin_tx(app, None, read_only=stmt.read_only if stmt else None)

    def block(self, app: AppState, name: str | None = None) -> tuple[Step, Frame]:
        """Enter a transaction block (psycopg ``conn.transaction()``): outer or nested.

        :param name: the savepoint name the app gave (quoted), which it may then use in
            its own SQL; None to make one up.
        """
        self._usable(app)
        key = _unquoted(name) if name else None
        if not app.frames:
            step = self._begin_tx(app, None)
            base = app.frames[-1]
            if name:
                # Production: BEGIN, then SAVEPOINT name; the app may release that one
                # and stay in its transaction.
                sql = step.sql + "; " + self._push(Frame(FrameKind.NESTED, name, app, key=key))
                step = Step(sql)
            return step, base
        frame = Frame(FrameKind.NESTED, name or self._name("corral_tx"), app, key=key)
        return Step(self._push(frame)), frame

    def end_block(self, app: AppState, frame: Frame, *, commit: bool) -> Step | None:
        """Leave a transaction block entered with :meth:`block`."""
        if frame not in app.frames:
            if app.lost is not None:
                self._usable(app)
            return None  # already ended by the app's own COMMIT/ROLLBACK, as in psycopg
        if frame.kind is FrameKind.TRANSACTION:
            return self.commit(app) if commit else self.rollback(app)
        if commit:
            self._merge_from(frame)
            return Step(self._flush() + _release(frame))
        self._discard_from(frame, reason="an enclosing block rolled back", actor=app)
        return Step(self._flush() + _rollback_to(frame), rolls_back=True)

    def commit(self, app: AppState) -> Step | None:
        """The app commits its transaction: release it into the sandbox."""
        self._usable(app)
        if not app.frames:
            return None
        base = app.frames[0]
        prefix = self._flush()
        readers = self._readers_below(base)
        self._merge_from(base)
        if base.read_only:
            # A read-only transaction changed nothing; rolling it back also drops its
            # READ ONLY setting, which RELEASE would leak into the rest of the sandbox.
            return Step(prefix + _rollback_to(base), rolls_back=True)
        sql = prefix + self._check_deferred() + _release(base)
        if readers:
            # Other apps' transactions right below, which have only read (they lent the
            # connection): in production this commit is outside them, and their rollback
            # cannot undo it. Re-open their savepoints above it, under the same names.
            sql += "; " + _release(readers[0])
            sql += "".join(f"; SAVEPOINT {f.name}" for f in readers)
        return Step(sql, _rollback_to(base))

    def _readers_below(self, base: Frame) -> list[Frame]:
        """The other apps' read-only-so-far transactions directly below *base*, lowest first."""
        found: list[Frame] = []
        for f in reversed(self.stack[: self.stack.index(base)]):
            a = f.app
            if f.kind is not FrameKind.TRANSACTION or a is None or a is base.app:
                break
            if a.wrote or a.frames != [f] or f.read_only:
                break
            found.append(f)
        found.reverse()
        return found

    def check_chain(self, app: AppState, stmt: Statement) -> None:
        """Raise what PostgreSQL raises for COMMIT / ROLLBACK AND CHAIN outside a
        transaction (an autocommit connection that has not begun one)."""
        if stmt.chain and app.autocommit and not app.frames:
            command = "COMMIT" if stmt.kind is Kind.COMMIT else "ROLLBACK"
            raise EmulatedServerError(
                "25P01", f"{command} AND CHAIN can only be used in transaction blocks"
            )

    def rollback(self, app: AppState) -> Step | None:
        """The app rolls its transaction back: back to its savepoint."""
        if app.lost is not None and not app.frames:
            app.lost = None  # rolling back a lost transaction is what the app should do
            return None
        self._usable(app)
        if not app.frames:
            return None
        base = app.frames[0]
        prefix = self._flush()
        self._discard_from(base, reason="another connection rolled back past it", actor=app)
        return Step(prefix + _rollback_to(base), rolls_back=True)

    # ------------------------------------------------------------------ app savepoints

    def check_user_savepoint(self, app: AppState, stmt: Statement) -> None:
        """Raise what PostgreSQL raises for SAVEPOINT & co. outside a transaction."""
        if not app.frames:
            raise EmulatedServerError(
                "25P01", f"{stmt.command} can only be used in transaction blocks"
            )

    def foreign_savepoint(self, app: AppState, stmt: Statement, *, failed: bool) -> Step | None:
        """Vet the app's RELEASE / ROLLBACK TO: a name the app did not make (the
        sandbox's own, another connection's) does not exist for it, as in production.

        :param failed: the app's transaction is failed (aborted).
        :returns: None when the name is the app's own (run its statement); else a step
            to send instead, which fails on the server as production's statement would
            (3B001), and so aborts the transaction as production's does.
        :raises EmulatedServerError: for a ROLLBACK TO in a failed transaction, which
            production answers with 3B001 and leaves failed: there is nothing to send.
        """
        name = stmt.name
        if stmt.kind is Kind.SAVEPOINT or name is None:
            return None
        if any(f.key == name for f in app.frames):
            return None
        if failed:
            if stmt.kind is Kind.RELEASE:
                return None  # the server answers 25P02 first, as production's does
            raise EmulatedServerError("3B001", f'savepoint "{name}" does not exist')
        return Step(_raise_sql("3B001", f'savepoint "{name}" does not exist'))

    def missing_savepoint(self, app: AppState, command: str, name: str) -> Step:
        """What production answers to *command* (RELEASE / ROLLBACK TO SAVEPOINT) naming
        a savepoint *name* that no longer exists: a step that fails as it would.

        :raises EmulatedServerError: outside a transaction (25P01: nothing to abort).
        """
        self._usable(app)
        if not app.frames:
            raise EmulatedServerError("25P01", f"{command} can only be used in transaction blocks")
        return Step(_raise_sql("3B001", f'savepoint "{_unquoted(name)}" does not exist'))

    def user_savepoint_done(self, app: AppState, stmt: Statement) -> None:
        """Track the app's own SAVEPOINT / RELEASE / ROLLBACK TO after it succeeded."""
        if stmt.kind is Kind.SAVEPOINT:
            frame = Frame(FrameKind.USER, "", app, key=stmt.name)
            self.stack.append(frame)
            app.frames.append(frame)
            return
        target = next((f for f in reversed(app.frames) if f.key == stmt.name), None)
        if target is None:
            return
        if stmt.kind is Kind.RELEASE:
            self._merge_from(target)
        else:
            self._discard_from(target, reason="a ROLLBACK TO SAVEPOINT", keep=True, actor=app)
