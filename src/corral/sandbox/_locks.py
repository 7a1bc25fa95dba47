"""The checkout locks that serialise concurrent users of one sandbox connection.

Reentrant for their holder (a thread, or an asyncio task), bounded waits that end in
:class:`~corral.errors.SandboxBusy` naming the holder, never a silent hang.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Generic, TypeVar

from corral.errors import SandboxBusy
from corral.sandbox._context import owner_name

__all__ = ["AsyncOwnerLock", "OwnerLock"]

H = TypeVar("H")
L = TypeVar("L", threading.Lock, asyncio.Lock)


def _busy(holder: object, timeout: float) -> SandboxBusy:
    return SandboxBusy(
        f"the sandbox's connection stayed in use by {owner_name(holder)} for {timeout:g} s. "
        "Users of one sandbox take turns (one checkout at a time, like one connection in "
        "production). If that holder is itself waiting for this code (e.g. it holds a "
        "connection while it awaits tasks that need one), that is a deadlock: return the "
        "connection first, or give each task its own sandbox; otherwise raise checkout_timeout."
    )


class _Reentrant(Generic[H, L]):
    """Holder, depth and release of a reentrant lock over *L*; acquiring is the shells'."""

    __slots__ = ("_depth", "_holder", "_lock")

    _lock: L | None  #: None: no underlying lock (yet), holder and depth say it all
    _holder: H | None
    _depth: int

    @property
    def holder(self) -> H | None:
        return self._holder

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._holder = None
            if self._lock is not None:
                self._lock.release()

    def force_release(self) -> None:
        """Free the lock whoever holds it (the sandbox is closing)."""
        if self._depth:
            self._depth = 0
            self._holder = None
            if self._lock is not None:
                self._lock.release()


class OwnerLock(_Reentrant[threading.Thread, threading.Lock]):
    """A reentrant lock owned by a thread, with bounded waits."""

    __slots__ = ()

    _lock: threading.Lock  # always made: a thread lock costs nothing to make or take

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder = None
        self._depth = 0

    def acquire(self, timeout: float | None) -> None:
        me = threading.current_thread()
        if self._holder is me:  # only this thread can have set it to itself
            self._depth += 1
            return
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            assert timeout is not None
            raise _busy(self._holder, timeout)
        self._holder = me
        self._depth = 1


class AsyncOwnerLock(_Reentrant["asyncio.Task[object]", asyncio.Lock]):
    """A reentrant lock owned by an asyncio task, with bounded waits.

    Most sandboxes never see two tasks want the lock at once (an empty test's close
    takes it once): the ``asyncio.Lock`` that queues waiters is made at the first
    contention, until then the holder and depth alone say who has it.
    """

    def __init__(self) -> None:
        self._lock = None
        self._holder = None
        self._depth = 0
        self._waiting = 0

    async def acquire(self, timeout: float | None) -> None:
        me = asyncio.current_task()
        if me is not None and self._holder is me:
            self._depth += 1
            return
        lock = self._lock
        if lock is None:
            if not self._depth:  # free, and never wanted by two tasks at once
                self._holder = me
                self._depth = 1
                return
            lock = self._lock = await _taken_lock()  # the first contention
        if not lock.locked() and not self._waiting:
            # Free and nobody queued: the acquire cannot wait, so it needs no timer
            # (an asyncio.timeout costs more than the rest of a checkout).
            await lock.acquire()
        else:
            self._waiting += 1
            try:
                async with asyncio.timeout(timeout):
                    await lock.acquire()
            except TimeoutError:
                assert timeout is not None
                raise _busy(self._holder, timeout) from None
            finally:
                self._waiting -= 1
        self._holder = me
        self._depth = 1


async def _taken_lock() -> asyncio.Lock:
    """A new ``asyncio.Lock``, taken on behalf of an :class:`AsyncOwnerLock`'s holder."""
    lock = asyncio.Lock()
    await lock.acquire()  # free, so it returns at once
    return lock
