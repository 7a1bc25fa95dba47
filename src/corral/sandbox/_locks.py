"""Turns on a sandbox's one connection: who may send statements on it, and when.

Users of one sandbox (sessions, checkouts) take turns at statement granularity where
that is indistinguishable from production: a holder between statements whose transaction
has made no writes *lends* the connection (the borrower's savepoints go above the
lender's, so the stack stays LIFO; the lender's next statement waits until the borrower
has handed everything back). A holder with a written transaction keeps its turn until
that transaction ends. A waiter blocked for a second on a holder that sits idle with
written work is deadlocked on it (it holds the connection while it waits for the waiter:
a session held across a request, a middleware's child task): it fails at once, naming
both. Only a holder busy in a statement is waited for up to ``checkout_timeout``.

The bookkeeping (:class:`_Turns`) is plain logic; :class:`OwnerLock` (threads) and
:class:`AsyncOwnerLock` (asyncio tasks) are its blocking and awaiting shells.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

from corral.errors import SandboxBusy
from corral.sandbox._context import owner_name
from corral.sandbox._controller import PATTERNS_DOCS as DOCS
from corral.sandbox._plan import AppState, FrameKind
from corral.sandbox._statements import Kind, Statement

__all__ = ["STALL", "AsyncOwnerLock", "OwnerLock", "reads"]

#: Seconds a waiter lets a holder sit idle on written, uncommitted work before calling
#: it a deadlock (the holder is waiting for the waiter).
STALL = 0.5
#: How often a waiter looks again at an idle holder (for the stall) while it waits.
_POLL = 0.1

_READS = frozenset({"SELECT", "SHOW", "VALUES", "TABLE", "FETCH", "EXPLAIN"})
_LOCKING = (" FOR UPDATE", " FOR SHARE", " FOR NO KEY", " FOR KEY SHARE")


def reads(st: Statement | None) -> bool:
    """Whether *st* only reads (a transaction of such statements may lend its turn).

    Unknown statements (prepared, unparsed) count as writes; so do row-locking SELECTs.
    """
    if st is None or st.kind is not Kind.OTHER or st.command not in _READS:
        return False
    upper = st.text.upper()
    return not any(word in upper for word in _LOCKING)


def _clean(app: AppState) -> bool:
    """An app that owns nothing on the stack but a transaction that only read."""
    frames = app.frames
    if not frames:
        return True
    return not app.wrote and len(frames) == 1 and frames[0].kind is FrameKind.TRANSACTION


class _Turn:
    """One owner's hold: checkouts and statements (depth), and its apps' state."""

    __slots__ = ("apps", "busy", "depth", "idle_since", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.depth = 0
        self.busy = 0  #: statements in progress
        self.apps: list[AppState] = []
        self.idle_since = time.monotonic()


class _Turns:
    """The stack of holders: the top one uses the connection; those below lent it."""

    __slots__ = ("stack",)

    def __init__(self) -> None:
        self.stack: list[_Turn] = []

    def find(self, owner: object) -> _Turn | None:
        for turn in self.stack:
            if turn.owner is owner:
                return turn
        return None

    def owner(self, app: AppState, current: object) -> object:
        """Who a statement of *app* runs for: the holder of its checkout (the checkout,
        not the task, holds the turn: SQLAlchemy may finish it in a task of its own)."""
        for turn in self.stack:
            if app in turn.apps:
                return turn.owner
        return current

    @staticmethod
    def lendable(turn: _Turn) -> bool:
        """Between statements, holding checkouts whose transactions only read (a sandbox
        operation, or a checkout not yet adopted, holds no app: never lent)."""
        return turn.busy == 0 and bool(turn.apps) and all(_clean(app) for app in turn.apps)

    def take(self, owner: object, statement: bool, exclusive: bool = False) -> bool:
        """Take a turn (reentrant; *exclusive*: never borrowed); False: wait."""
        stack = self.stack
        if stack:
            top = stack[-1]
            if top.owner is owner:
                turn = top
            elif exclusive or self.find(owner) is not None or not self.lendable(top):
                return False  # a lender waits for its borrowers; a writer is waited for
            else:
                turn = _Turn(owner)
                stack.append(turn)
        else:
            turn = _Turn(owner)
            stack.append(turn)
        turn.depth += 1
        if statement:
            turn.busy += 1
        return True

    def give(
        self, owner: object, *, app: AppState | None = None, wrote: bool | None = None
    ) -> None:
        """Hand back what :meth:`take` took.

        :param app: with *wrote* None, the app of a checkout that ends (forgotten); with
            *wrote*, the app whose statement just ran.
        :param wrote: None for a checkout or a sandbox operation; else whether the
            statement that just ran may have written.
        """
        turn = self.find(owner)
        if wrote is None and app is not None:
            # A checkout may be handed back elsewhere (a pool's reset, another task):
            # its turn is the one that adopted it.
            turn = next((t for t in self.stack if app in t.apps), turn)
        if turn is None:
            return
        if wrote is not None:
            turn.busy = max(0, turn.busy - 1)
            turn.idle_since = time.monotonic()
            if app is not None:
                app.wrote = bool(app.frames) and (app.wrote or wrote)
        elif app is not None and app in turn.apps:
            turn.apps.remove(app)
        turn.depth -= 1
        if turn.depth <= 0:
            self.stack.remove(turn)

    def adopt(self, owner: object, app: AppState) -> None:
        turn = self.find(owner)
        if turn is not None:
            turn.apps.append(app)

    def stalled(self, *, patience: float = STALL) -> _Turn | None:
        """The holder a waiter is deadlocked on: idle on written work for *patience* s."""
        if not self.stack:
            return None
        top = self.stack[-1]
        if top.busy or time.monotonic() - top.idle_since < patience:
            return None
        return top if any(not _clean(app) for app in top.apps) else None


def _pattern(holder: object, waiter: object) -> str:
    if isinstance(holder, asyncio.Task) and isinstance(waiter, asyncio.Task):
        return (
            "a task waiting for a task it started: a middleware's child task (Starlette "
            "BaseHTTPMiddleware), or asyncio.gather over sessions of one sandbox"
        )
    if isinstance(holder, threading.Thread) and isinstance(waiter, threading.Thread):
        return (
            "a session held across a request: the test (or a fixture) keeps a transaction "
            "with writes open while the app, on another thread (a sync TestClient), needs "
            "the connection"
        )
    return "a thread and a task waiting for each other"


def _deadlock(turn: _Turn, waiter: object) -> SandboxBusy:
    waiting, holding = owner_name(waiter), owner_name(turn.owner)
    return SandboxBusy(
        f"deadlock: {waiting} needs the sandbox's connection, but {holding} holds it with an "
        "uncommitted transaction that wrote, and has stopped using it: it is waiting for "
        f"{waiting}. Pattern: {_pattern(turn.owner, waiter)}. A sandbox has one connection, so "
        "two write transactions cannot interleave on it. Commit (or roll back) before the "
        "request or the awaited task, or give the work its own session after the commit. "
        f"See {DOCS}"
    )


def _busy(holder: object, timeout: float) -> SandboxBusy:
    return SandboxBusy(
        f"{owner_name(holder)} held the sandbox's one connection for {timeout:g} s: a statement "
        "that long, or a holder stuck elsewhere. Raise checkout_timeout if the statement is "
        f"legitimately slow. See {DOCS}"
    )


class _Shell:
    """What both shells share: the turns, who holds, force_release, adopt."""

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        self._turns = _Turns()

    @property
    def holder(self) -> object | None:
        stack = self._turns.stack
        return stack[-1].owner if stack else None

    def force_release(self) -> None:
        """Free the lock whoever holds it (the sandbox is closing)."""
        self._turns.stack.clear()

    def _timed_out(self, waiter: object, timeout: float) -> SandboxBusy:
        stalled = self._turns.stalled(patience=0.0)
        return _deadlock(stalled, waiter) if stalled is not None else _busy(self.holder, timeout)

    def _waits(
        self,
        me: object,
        timeout: float | None,
        statement: bool,
        exclusive: bool,
        now: Callable[[], float],
    ) -> Iterator[float]:
        """The wait for a turn that was not free, for both shells: yields how long to
        wait for a wake-up (the shell blocks or awaits), returns once the turn is taken.

        Only the slow path comes here: the shells try :meth:`_Turns.take` first.

        :raises SandboxBusy: the holder is deadlocked on *me*, or *timeout* ran out.
        """
        deadline = None if timeout is None else now() + max(0.0, timeout)
        while True:
            left = None if deadline is None else deadline - now()
            if left is not None and left <= 0:
                raise self._timed_out(me, timeout or 0.0)
            yield _POLL if left is None else min(_POLL, left)
            if self._turns.take(me, statement, exclusive):
                return
            stalled = self._turns.stalled()
            if stalled is not None:
                raise _deadlock(stalled, me)


class OwnerLock(_Shell):
    """Turns for threads: a reentrant lock that lends between read-only statements."""

    __slots__ = ("_cond",)

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, timeout: float | None, *, exclusive: bool = False) -> None:
        """Take a turn for a checkout, or for a sandbox operation that must not borrow
        (*exclusive*: closing or restoring waits for every other holder)."""
        self._take(threading.current_thread(), timeout, exclusive=exclusive)

    def _take(
        self, me: object, timeout: float | None, statement: bool = False, exclusive: bool = False
    ) -> None:
        """Take *me*'s turn (*statement*: one statement's, see :meth:`turn`)."""
        with self._cond:
            if self._turns.take(me, statement, exclusive):
                return
            for wait in self._waits(me, timeout, statement, exclusive, time.monotonic):
                self._cond.wait(wait)

    def release(self, app: AppState | None = None) -> None:
        """Hand back a checkout (*app*: the proxy's, now done) or a sandbox operation."""
        with self._cond:
            self._turns.give(threading.current_thread(), app=app)
            self._cond.notify_all()

    def adopt(self, app: AppState) -> None:
        """The current holder's new checkout: its transaction state decides lending."""
        with self._cond:
            self._turns.adopt(threading.current_thread(), app)

    @contextmanager
    def turn(self, app: AppState, timeout: float | None, *, write: bool) -> Iterator[None]:
        """Around one statement of *app* (*write*: it may write) or transaction step."""
        with self._cond:
            me = self._turns.owner(app, threading.current_thread())
        self._take(me, timeout, statement=True)
        try:
            yield
        finally:
            with self._cond:
                self._turns.give(me, app=app, wrote=write)
                self._cond.notify_all()

    def force_release(self) -> None:
        with self._cond:
            super().force_release()
            self._cond.notify_all()


def _task() -> object:
    task = asyncio.current_task()
    return task if task is not None else threading.current_thread()


class AsyncOwnerLock(_Shell):
    """Turns for asyncio tasks of one event loop; the same rules as :class:`OwnerLock`."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[None]] = []

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def acquire(self, timeout: float | None, *, exclusive: bool = False) -> None:
        """See :meth:`OwnerLock.acquire`."""
        await self._take(_task(), timeout, exclusive=exclusive)

    async def _take(
        self, me: object, timeout: float | None, statement: bool = False, exclusive: bool = False
    ) -> None:
        if self._turns.take(me, statement, exclusive):
            return
        loop = asyncio.get_running_loop()
        for wait in self._waits(me, timeout, statement, exclusive, loop.time):
            fut = loop.create_future()
            self._waiters.append(fut)
            with suppress(TimeoutError):
                await asyncio.wait_for(fut, wait)

    def release(self, app: AppState | None = None) -> None:
        self._turns.give(_task(), app=app)
        self._wake()

    def adopt(self, app: AppState) -> None:
        self._turns.adopt(_task(), app)

    @asynccontextmanager
    async def turn(
        self, app: AppState, timeout: float | None, *, write: bool
    ) -> AsyncIterator[None]:
        me = self._turns.owner(app, _task())
        await self._take(me, timeout, statement=True)
        try:
            yield
        finally:
            self._turns.give(me, app=app, wrote=write)
            self._wake()

    def force_release(self) -> None:
        super().force_release()
        self._wake()
