"""What every sandboxed handle shares, whatever the driver: mode, registry, routing.

Adapters subclass :class:`SandboxController` (sync) or :class:`AsyncSandboxController`
and implement the four sandbox operations for their driver's connection.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

from corral.errors import SandboxBroken, SandboxError, SandboxNotActive
from corral.sandbox._context import Router, current_owner
from corral.sandbox._plan import Plan

__all__ = [
    "ENV_MODE",
    "MODES",
    "PATTERNS_DOCS",
    "AsyncSandboxController",
    "BaseController",
    "BoxBase",
    "SandboxController",
    "Sharing",
    "registered",
    "resolve_mode",
]

logger = logging.getLogger("corral.sandbox")

#: The environment variable read when ``mode`` is not given (the pytest plugin sets it).
ENV_MODE = "CORRAL_SANDBOX_MODE"
#: Where the docs explain the test patterns behind a missing or busy sandbox.
PATTERNS_DOCS = "https://corral.readthedocs.io/en/latest/sandbox/#patterns"
MODES = ("sandbox", "normal")

T = TypeVar("T")


def resolve_mode(mode: str | None) -> str:
    """*mode*, else ``$CORRAL_SANDBOX_MODE``, else ``"normal"`` (production is the default)."""
    chosen = mode if mode is not None else os.environ.get(ENV_MODE, "").strip() or "normal"
    chosen = chosen.lower()
    if chosen not in MODES:
        source = "mode" if mode is not None else ENV_MODE
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, not {chosen!r}")
    return chosen


class BoxBase:
    """One open sandbox: a connection inside the outer transaction, and its plan.

    :ivar plan: the savepoint bookkeeping of the connection.
    :ivar previous: the sandbox this one shadows in its context (independent nesting).
    :ivar proxies: the application's live checkouts of this sandbox's connection (its
        proxies); None until the first one (an empty test makes none).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.closed = False
        self.broken: BaseException | None = None
        self.previous: BoxBase | None = None
        self.proxies: weakref.WeakSet[Any] | None = None
        #: the event loop an async sandbox was opened on (its connection's)
        self.loop: Any = None
        #: what other handles must match to join this sandbox (None: none may)
        self.key: object = None
        #: per sandbox level, outermost first: the handles whose sandbox it is (one,
        #: unless handles on one database share the connection: see BaseController)
        self.members: list[list[Any]] = []

    def track(self, proxy: Any) -> None:
        """Remember *proxy*, a checkout of this sandbox, to detach it at close."""
        if self.proxies is None:
            self.proxies = weakref.WeakSet()
        self.proxies.add(proxy)

    def check(self) -> None:
        """Raise unless the sandbox is usable: its connection was lost, or it is closed.

        :raises SandboxBroken: the connection died; the test's data is gone.
        :raises SandboxError: the sandbox was closed.
        """
        if self.broken is not None:
            raise SandboxBroken(
                "the sandbox's connection was lost (backend terminated?); this test's "
                "data is gone. Close this sandbox; the next one gets a healthy connection."
            ) from self.broken
        if self.closed:
            raise SandboxError("the sandbox this connection belonged to is closed")

    def _start_closing(self) -> bool:
        """Mark the sandbox closed and its proxies unusable; False if it already was."""
        if self.closed:
            return False
        self.closed = True
        if self.proxies:
            for proxy in list(self.proxies):
                proxy._detach()
        return True


B = TypeVar("B", bound=BoxBase)

_REGISTRY: weakref.WeakSet[BaseController[Any]] = weakref.WeakSet()
_REGISTRY_LOCK = threading.Lock()


def registered() -> list[SandboxController[Any] | AsyncSandboxController[Any]]:
    """The live sandboxed handles in sandbox mode, oldest first.

    The pytest plugin opens one sandbox on each before a test and closes it after;
    the registry holds them weakly, so a handle the app drops disappears from it.
    """
    with _REGISTRY_LOCK:
        live = [c for c in _REGISTRY if c.mode == "sandbox"]
    live.sort(key=lambda c: c._serial)
    return [c for c in live if isinstance(c, SandboxController | AsyncSandboxController)]


class Sharing:
    """Returned by :meth:`BaseController.share`; leaving the ``with`` block unshares."""

    def __init__(self, controller: BaseController[Any], box: BoxBase) -> None:
        self._controller = controller
        self._box = box

    def __enter__(self) -> Sharing:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._controller._router.unshare(self._box)


class BaseController(Generic[B]):
    """Mode, registry, routing and allowances of one sandboxed handle.

    Handles of one connection kind (:attr:`_connection_kind`) that reach one database
    share a context's sandbox: a handle opening its sandbox where another's is open on
    the same database joins that one (its connection, its transaction) instead of
    opening a second; each sandbox level remembers its handles (``box.members``), and
    the last one to close it rolls it back. ``own_connection=True`` opts out.
    """

    is_async: ClassVar[bool] = False
    #: handles of one kind can share a connection (None: this one never does)
    _connection_kind: ClassVar[str | None] = None
    _serials = iter(range(1, 1 << 62))

    def __init__(
        self,
        *,
        mode: str | None = None,
        lock_timeout: float | None = 5.0,
        checkout_timeout: float | None = 30.0,
        isolation_level: str | None = None,
        check_deferred: bool | None = None,
        own_connection: bool = False,
    ) -> None:
        self._mode = resolve_mode(mode)
        self.own_connection = own_connection
        self._key: object = _UNKNOWN
        self.lock_timeout = lock_timeout
        self.checkout_timeout = checkout_timeout
        self.isolation_level = isolation_level
        self.check_deferred = check_deferred
        self._deferrable_exists: bool | None = None
        self._router: Router[B] = Router()
        self._serial = next(self._serials)
        with _REGISTRY_LOCK:
            _REGISTRY.add(self)

    # ------------------------------------------------------------------ mode

    @property
    def mode(self) -> str:
        """``"sandbox"`` or ``"normal"`` (a transparent pass-through)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        value = resolve_mode(value)
        if value != self._mode and self._router.current() is not None:
            raise SandboxError("close the open sandbox before changing the mode")
        self._mode = value

    @property
    def sandboxing(self) -> bool:
        return self._mode == "sandbox"

    def _new_plan(self) -> Plan:
        return Plan(
            lock_timeout=self.lock_timeout,
            isolation_level=self.isolation_level,
            check_deferred=self.check_deferred,
            deferrable_exists=self._deferrable_exists,
        )

    def _learn(self, plan: Plan) -> None:
        """Keep the first sandbox's answer about deferrable constraints for the next ones.

        One handle serves one database, whose schema does not change between tests
        (DDL inside a test is rolled back), so the catalog is asked once per handle.
        """
        if self._deferrable_exists is None:
            self._deferrable_exists = plan.deferrable_exists

    # ------------------------------------------------------------------ sharing a connection

    def _target(self) -> tuple[str, str, str] | None:
        """The database this handle reaches, from its configuration; None: unknown."""
        return None

    def _join_key(self) -> object:
        """What another handle's sandbox must match for this one to join it (None: never).

        Same connection kind, same database, same isolation level of the outer
        transaction. Worked out once per handle (parsing a conninfo costs microseconds).
        """
        if self._key is _UNKNOWN:
            kind = self._connection_kind
            where = None if self.own_connection or kind is None else self._target()
            self._key = None if where is None else (kind, where, self.isolation_level)
        return self._key

    def _join(self, outer: B | None, nest: bool) -> B | None:
        """The open sandbox :meth:`create_sandbox` joins instead of opening or nesting
        one (no I/O); None: open (or nest) as usual.

        A handle joins the innermost level of a sandbox it shares when another handle
        opened that level; else, with no sandbox of its own here, the sandbox another
        handle on its database has open in this context.
        """
        if not nest:
            return None
        if outer is not None:
            level = outer.members[-1]
            if self in level:
                return None
            level.append(self)
            return outer
        key = self._join_key()
        if key is None:
            return None
        host = self._router.joinable(key)
        if host is not None:
            host.members[-1].append(self)
            self._router.set(host)
        return host

    def _opened(self, box: B) -> None:
        """*box* is this handle's newly opened sandbox (it may be joined from now on)."""
        box.key = self._join_key()
        box.members = [[self]]

    def _leave(self, box: B) -> bool:
        """Leave *box*'s innermost level if other handles still share it: True, nothing
        else to do (no I/O). False: this handle is its last; roll it back.

        :raises SandboxError: the innermost level belongs to other handles only.
        """
        level = box.members[-1] if box.members else [self]
        if self not in level:
            others = ", ".join(_handle_name(c) for c in level)
            raise SandboxError(
                f"closing the sandbox of {_handle_name(self)} in the wrong order: it shares "
                f"its connection with {others}, whose sandbox level was opened inside it "
                "and is still open. Close sandboxes in the reverse order of opening (or "
                "give a handle its own connection: sandbox(..., own_connection=True))"
            )
        if len(level) == 1:
            return False
        level.remove(self)
        self._drop_if_left(box)
        return True

    def _closing(self) -> B | None:
        """The box ``close_sandbox`` must roll back, or None: not sandboxing, or other
        handles still share the level this handle leaves (see :meth:`_leave`)."""
        if not self.sandboxing:
            return None
        box = self._owned()
        return None if self._leave(box) else box

    def _popped(self, box: B) -> None:
        """This handle rolled back *box*'s innermost level (the box stays open)."""
        box.members.pop()
        self._drop_if_left(box)

    def _drop_if_left(self, box: B) -> None:
        if not any(self in level for level in box.members):
            self._router.revoke(box)
            self._router.set(None)

    # ------------------------------------------------------------------ routing

    @property
    def active(self) -> bool:
        """Whether code running here would use a sandbox (owned, allowed or shared)."""
        return self._router.current() is not None

    def _route(self) -> B:
        box = self._router.current()
        if box is None:
            raise SandboxNotActive(
                f"{type(self).__name__} is in sandbox mode but this code runs in a context "
                f"with no sandbox ({_where()}), so its query was refused rather than "
                f"committed. {self._no_sandbox_hint()}Open one here (create_sandbox() / "
                "sandboxed()), or let this thread, task or executor into the test's sandbox "
                "with db.allow(...), or make the test's sandbox shared (db.share()) for a "
                f"server under test. See {PATTERNS_DOCS}"
            )
        return box

    def _no_sandbox_hint(self) -> str:
        """The pattern most likely behind a query with no sandbox."""
        if self.is_async:
            return (
                "Pattern: an async handle outside an async test's loop. Async handles get "
                "their sandbox on the event loop of an async test: a sync test (or a sync "
                "TestClient, whose portal runs the app on a loop of its own) has none for "
                "them; make the test async (httpx.AsyncClient over ASGITransport). "
            )
        return ""

    def _owned(self) -> B:
        box = self._router.owned()
        if box is None:
            raise SandboxError(
                f"no sandbox is open in this context ({_where()}); create_sandbox() first"
            )
        return box

    def allow(self, target: T) -> T:
        """Let other code use the current context's sandbox.

        :param target: a ``threading.Thread`` (before or after it starts), an
            ``asyncio.Task``, a ``concurrent.futures`` thread pool (each job submitted
            from now on runs in the sandbox), or a callable (returns a wrapper that
            runs it in the sandbox; coroutine functions stay coroutine functions).
        :returns: *target*, or the wrapper for a callable.
        :raises SandboxError: no sandbox in this context, or a process pool.
        """
        if not self.sandboxing:
            return target
        return self._router.allow(target, self._owned())

    def share(self) -> Sharing:
        """Shared mode: contexts with no sandbox of their own use this context's sandbox.

        For a server under test running in its own thread or task. Ends at
        :meth:`unshare`, when the sandbox closes, or at the end of ``with db.share():``.
        """
        if not self.sandboxing:
            return Sharing(self, BoxBase(self._new_plan()))
        box = self._owned()
        self._router.share(box)
        return Sharing(self, box)

    def unshare(self) -> None:
        """Leave shared mode."""
        self._router.unshare()

    def _forget(self, box: B) -> None:
        self._router.revoke(box)
        nxt = box.previous
        self._router.set(nxt if nxt is not None and not nxt.closed else None)  # type: ignore[arg-type]


_UNKNOWN = object()


def _handle_name(controller: BaseController[Any]) -> str:
    handle = vars(controller).get("pool") or vars(controller).get("engine")
    return f"sandbox({handle!r})" if handle is not None else repr(controller)


def _where() -> str:
    from corral.sandbox._context import owner_name

    return owner_name(current_owner())


class SandboxController(BaseController[B], abc.ABC):
    """A sandboxed synchronous handle: the contract the pytest plugin relies on."""

    is_async: ClassVar[bool] = False

    @abc.abstractmethod
    def create_sandbox(self, *, nest: bool = True) -> None:
        """Open a sandbox for this context (a nested one if this context has one).

        :param nest: False opens an independent sandbox (its own connection) even when
            this context already sees one, e.g. in tasks inheriting a parent's context.
        """

    @abc.abstractmethod
    def close_sandbox(self) -> None:
        """Roll back and close this context's innermost sandbox level."""

    @abc.abstractmethod
    def restore_sandbox(self) -> None:
        """Roll back to the start of the innermost sandbox level; keep it open."""

    @abc.abstractmethod
    def discard_idle(self) -> None:
        """Close the idle connections this handle keeps; leave checked-out ones alone.

        For a database that was dropped and created again under the same name (what the
        pytest plugin does after a ``no_sandbox`` test): idle connections to the old one
        are dead, and the next checkout would get one. The handle stays usable; later
        checkouts get new connections. Works in both modes, with or without an open
        sandbox (the sandbox's own connection is checked out: it stays).
        """

    @contextmanager
    def sandboxed(self, *, nest: bool = True) -> Iterator[Any]:
        """``with db.sandboxed():`` — create on entry, close on exit."""
        self.create_sandbox(nest=nest)
        try:
            yield self
        finally:
            self.close_sandbox()


class AsyncSandboxController(BaseController[B], abc.ABC):
    """A sandboxed asyncio handle: the same contract with awaitable operations."""

    is_async: ClassVar[bool] = True

    @abc.abstractmethod
    async def create_sandbox(self, *, nest: bool = True) -> None:
        """See :meth:`SandboxController.create_sandbox`."""

    @abc.abstractmethod
    async def close_sandbox(self) -> None:
        """See :meth:`SandboxController.close_sandbox`."""

    @abc.abstractmethod
    async def restore_sandbox(self) -> None:
        """See :meth:`SandboxController.restore_sandbox`."""

    @abc.abstractmethod
    async def discard_idle(self) -> None:
        """See :meth:`SandboxController.discard_idle`; run it on the handle's event loop."""

    @asynccontextmanager
    async def sandboxed(self, *, nest: bool = True) -> AsyncIterator[Any]:
        """``async with db.sandboxed():`` — create on entry, close on exit."""
        await self.create_sandbox(nest=nest)
        try:
            yield self
        finally:
            await self.close_sandbox()
