"""The sandbox lifecycle every adapter shares: open (retrying dead connections), nest,
close, restore, checkout — written once, sync and async twins, over each driver's box.

A driver adapter supplies its box (``open``, ``run``, ``close``, ``abort`` — kill the
connection —, and ``rolled_back``, told after each ROLLBACK TO of a sandbox level),
where connections come from (``_take``/``_give``/``_discard``) and the proxy the app
gets (``_new_proxy``); the order of operations, the locking and the error handling
live here.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, ClassVar, TypeVar

from corral.errors import SandboxBroken, SandboxBusy, SandboxNotActive
from corral.sandbox._controller import (
    PATTERNS_DOCS,
    AsyncSandboxController,
    BoxBase,
    SandboxController,
    _where,
)

__all__ = ["AsyncBoxController", "BoxController"]

logger = logging.getLogger("corral.sandbox")

_OPEN_ATTEMPTS = 3


B = TypeVar("B", bound=BoxBase)


def _open_failed() -> SandboxBroken:
    return SandboxBroken(f"could not open a sandbox: {_OPEN_ATTEMPTS} connections in a row failed")


class BoxController(SandboxController[B]):
    """:class:`SandboxController` operations over boxes of one driver (synchronous)."""

    #: what opening a box on a connection that died while idle raises
    _dead_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def _take(self) -> Any:
        raise NotImplementedError

    def _give(self, real: Any) -> None:
        raise NotImplementedError

    def _new_box(self, real: Any) -> B:
        raise NotImplementedError

    def _discard(self, real: Any) -> None:
        """Close a connection found dead (it then goes back through :meth:`_give`)."""
        raise NotImplementedError

    def _new_proxy(self, box: B, **options: Any) -> Any:
        """The application's proxy of *box*'s connection (the checkout is taken)."""
        raise NotImplementedError

    def _joined(self) -> None:
        """After joining another handle's sandbox (the engine adapter's hook)."""

    def _checkout(self, timeout: float | None, **options: Any) -> Any:
        """A proxy of this context's sandbox connection, once no other user has it."""
        box: Any = self._route()
        box.check()
        box.lock.acquire(timeout if timeout is not None else self.checkout_timeout)
        return self._new_proxy(box, **options)

    def _open_box(self) -> B:
        last: BaseException | None = None
        for _ in range(_OPEN_ATTEMPTS):
            real = self._take()
            box = self._new_box(real)
            try:
                box.open()  # type: ignore[attr-defined]
            except self._dead_errors as exc:
                # A connection that died while idle in the pool: discard it, take another.
                last = exc
                logger.info("discarding a dead connection while opening a sandbox: %s", exc)
                self._discard(real)
                self._give(real)
                continue
            self._learn(box.plan)
            return box
        raise _open_failed() from last

    def create_sandbox(self, *, nest: bool = True) -> None:
        if not self.sandboxing:
            return
        outer: Any = self._router.owned()
        if self._join(outer, nest) is not None:
            self._joined()
            return
        if outer is not None and nest:
            outer.lock.acquire(self.checkout_timeout)
            try:
                outer.run(outer.plan.push_sandbox())
                outer.members.append([self])
            finally:
                outer.lock.release()
            return
        box = self._open_box()
        box.previous = outer
        self._opened(box)
        self._router.set(box)

    def close_sandbox(self) -> None:
        box: Any = self._closing()
        if box is None:
            return
        busy: SandboxBusy | None = None
        try:
            box.lock.acquire(self.checkout_timeout, exclusive=True)
        except SandboxBusy as exc:
            busy = exc  # close anyway: a leaked checkout must not leak the sandbox
            box.abort()
        try:
            if box.plan.depth > 1 and busy is None and box.broken is None:
                box.run(box.plan.pop_sandbox())
                box.rolled_back()
                self._popped(box)
                return
            box.close()
            self._forget(box)
        finally:
            box.lock.release()
        if busy is not None:
            raise busy

    def restore_sandbox(self) -> None:
        if not self.sandboxing:
            return
        box: Any = self._owned()
        box.lock.acquire(self.checkout_timeout, exclusive=True)
        try:
            box.run(box.plan.restore())
            box.rolled_back()
        finally:
            box.lock.release()


class AsyncBoxController(AsyncSandboxController[B]):
    """:class:`AsyncSandboxController` operations over boxes of one driver (asyncio).

    Connections kept between sandboxes belong to the event loop that made them (an
    asyncpg connection cannot wait on another loop). When sandboxes move to another
    loop (an event loop per test), the kept ones are taken out of reach, never handed
    out again, and closed on their own loop when it shuts down: a keeper task per loop
    (an ``asyncio.Runner`` cancels it before closing the loop) does that.
    """

    _dead_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: whether a connection serves only the loop it was made on (asyncpg, SQLAlchemy's
    #: async adapters); psycopg's own async connections wait on whichever loop runs them
    _loop_bound: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: the loop the kept connections belong to (None: none kept yet)
        self._kept_loop: asyncio.AbstractEventLoop | None = None
        #: connections kept on a loop sandboxes moved away from, for its keeper to close
        self._orphans: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self._keepers: set[asyncio.Task[None]] = set()  # strong references to running tasks

    def _unkeep(self) -> list[Any]:
        """Take the connections kept for the next sandboxes out of reach (no I/O)."""
        return []

    async def _close_kept(self, kept: list[Any]) -> None:
        """Close what :meth:`_unkeep` took, on the loop it belongs to."""

    async def _follow_loop(self) -> None:
        loop = asyncio.get_running_loop()
        old = self._kept_loop
        if loop is old:
            return
        if old is not None:
            stale = self._unkeep()
            if stale and not old.is_closed():
                self._orphans.setdefault(old, []).extend(stale)
            elif stale and not self._loop_bound:
                # The loop was closed without cancelling its tasks (pytest-asyncio < 1.0
                # closes its function loops so), so its keeper never ran; connections that
                # serve any loop (psycopg's) are closed here instead of left to the
                # collector, which warns about each.
                await self._close_kept(stale)
            # A closed loop's loop-bound connections cannot be closed politely any more:
            # dropped, their sockets close when collected.
        self._kept_loop = loop
        # A fresh context: the keeper must not hold the sandboxes of the test it starts in.
        keeper = loop.create_task(self._keep(loop), context=contextvars.Context())
        self._keepers.add(keeper)
        keeper.add_done_callback(self._keepers.discard)

    async def _keep(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.create_future()  # until the loop shuts down (its tasks are cancelled)
        finally:
            kept = self._orphans.pop(loop, [])
            if self._kept_loop is loop:
                kept += self._unkeep()
                self._kept_loop = None
            if kept:
                try:
                    await self._close_kept(kept)
                except Exception as exc:
                    logger.info("closing kept connections at the end of their loop: %s", exc)

    async def _take(self) -> Any:
        raise NotImplementedError

    async def _give(self, real: Any) -> None:
        raise NotImplementedError

    def _new_box(self, real: Any) -> B:
        raise NotImplementedError

    async def _discard(self, real: Any) -> None:
        raise NotImplementedError

    def _new_proxy(self, box: B, **options: Any) -> Any:
        raise NotImplementedError

    async def _joined(self) -> None:
        """After joining another handle's sandbox (the engine adapter's hook)."""

    async def _checkout(self, timeout: float | None, **options: Any) -> Any:
        box: Any = self._route()
        box.check()
        if (
            self._loop_bound
            and box.loop is not asyncio.get_running_loop()
            and self._router.only_shared(box)
        ):
            raise SandboxNotActive(
                f"{type(self).__name__}: the test's shared sandbox belongs to another event "
                f"loop ({_where()} runs a loop of its own, e.g. a sync TestClient's portal "
                "thread); an async connection serves one loop. Pattern: an async app behind "
                "a sync client. Drive the app on the test's loop (httpx.AsyncClient over "
                f"ASGITransport in an async test). See {PATTERNS_DOCS}"
            )
        await box.lock.acquire(timeout if timeout is not None else self.checkout_timeout)
        return self._new_proxy(box, **options)

    async def _open_box(self) -> B:
        await self._follow_loop()
        box = await self._open_box_here()
        box.loop = self._kept_loop
        return box

    async def _open_box_here(self) -> B:
        last: BaseException | None = None
        for _ in range(_OPEN_ATTEMPTS):
            real = await self._take()
            box = self._new_box(real)
            try:
                await box.open()  # type: ignore[attr-defined]
            except self._dead_errors as exc:
                last = exc
                logger.info("discarding a dead connection while opening a sandbox: %s", exc)
                await self._discard(real)
                await self._give(real)
                continue
            self._learn(box.plan)
            return box
        raise _open_failed() from last

    async def create_sandbox(self, *, nest: bool = True) -> None:
        if not self.sandboxing:
            return
        outer: Any = self._router.owned()
        if self._join(outer, nest) is not None:
            await self._joined()
            return
        if outer is not None and nest:
            await outer.lock.acquire(self.checkout_timeout)
            try:
                await outer.run(outer.plan.push_sandbox())
                outer.members.append([self])
            finally:
                outer.lock.release()
            return
        box = await self._open_box()
        box.previous = outer
        self._opened(box)
        self._router.set(box)

    async def close_sandbox(self) -> None:
        box: Any = self._closing()
        if box is None:
            return
        busy: SandboxBusy | None = None
        try:
            await box.lock.acquire(self.checkout_timeout, exclusive=True)
        except SandboxBusy as exc:
            busy = exc  # close anyway: a leaked checkout must not leak the sandbox
            await box.abort()
        try:
            if box.plan.depth > 1 and busy is None and box.broken is None:
                await box.run(box.plan.pop_sandbox())
                await box.rolled_back()
                self._popped(box)
                return
            await box.close()
            self._forget(box)
        finally:
            box.lock.release()
        if busy is not None:
            raise busy

    async def restore_sandbox(self) -> None:
        if not self.sandboxing:
            return
        box: Any = self._owned()
        await box.lock.acquire(self.checkout_timeout, exclusive=True)
        try:
            await box.run(box.plan.restore())
            await box.rolled_back()
        finally:
            box.lock.release()
