"""Which sandbox serves the current code: the one ContextVar, plus explicit allowances.

A sandbox belongs to the context that created it (an asyncio task and the tasks it
starts, or a thread). Other threads, tasks and executors get in only through
:meth:`Router.allow` or shared mode. Nothing else in corral touches the ContextVar.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from corral.errors import SandboxError

__all__ = ["Router", "current_owner", "owner_name"]


class _Box(Protocol):
    @property
    def closed(self) -> bool: ...

    @property
    def key(self) -> object: ...


B = TypeVar("B", bound=_Box)
T = TypeVar("T")

_EMPTY: MappingProxyType[object, Any] = MappingProxyType({})
#: router -> the sandbox this context owns on it. Immutable mappings, so a task that
#: inherits its parent's context can shadow an entry without affecting the parent.
#: (Changed through ``.copy()``: ``dict(proxy)`` goes key by key, ten times slower.)
_SANDBOXES: ContextVar[MappingProxyType[object, Any]] = ContextVar(
    "corral_sandboxes", default=_EMPTY
)


def current_owner() -> object:
    """The current asyncio task when one runs, else the current thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.current_thread()


def owner_name(owner: object) -> str:
    if isinstance(owner, asyncio.Task):
        return f"task {owner.get_name()!r}"
    if isinstance(owner, threading.Thread):
        return f"thread {owner.name!r}"
    return repr(owner)


class Router(Generic[B]):
    """Routes the current context to its sandbox, for one controller."""

    def __init__(self) -> None:
        self._tasks: weakref.WeakKeyDictionary[asyncio.Task[Any], B] = weakref.WeakKeyDictionary()
        self._threads: weakref.WeakKeyDictionary[threading.Thread, B] = weakref.WeakKeyDictionary()
        self._executors: dict[int, tuple[concurrent.futures.Executor, B]] = {}
        self._shared: B | None = None
        self._lock = threading.Lock()
        #: whether allow() was ever called: until then the lookups below skip the
        #: weak dictionaries (whose len() alone costs more than a whole owned() lookup)
        self._allowed = False

    def owned(self) -> B | None:
        """The open sandbox the current context itself created (or inherited)."""
        box: B | None = _SANDBOXES.get().get(self)
        return None if box is None or box.closed else box

    def joinable(self, key: object) -> B | None:
        """An open sandbox of another handle in this context whose key is *key*."""
        for box in _SANDBOXES.get().values():
            if box.key == key and not box.closed:
                return box  # type: ignore[no-any-return]
        return None

    def current(self) -> B | None:
        """The sandbox to use here: owned, else allowed for this task/thread, else shared."""
        box: B | None = _SANDBOXES.get().get(self)
        if box is not None and not box.closed:
            return box
        if self._allowed:
            box = self._allowed_here()
            if box is not None:
                return box
        shared = self._shared
        return shared if shared is not None and not shared.closed else None

    def only_shared(self, box: B) -> bool:
        """Whether *box* serves the current context only through shared mode."""
        if box is not self._shared or _SANDBOXES.get().get(self) is box:
            return False
        return not (self._allowed and self._allowed_here() is box)

    def _allowed_here(self) -> B | None:
        """The open sandbox allow() gave the current task or thread, if any."""
        if self._tasks:
            try:
                task = asyncio.current_task()
            except RuntimeError:
                task = None
            if task is not None:
                box = self._tasks.get(task)
                if box is not None and not box.closed:
                    return box
        if self._threads:
            box = self._threads.get(threading.current_thread())
            if box is not None and not box.closed:
                return box
        return None

    def set(self, box: B | None) -> None:
        """Make *box* (None: no sandbox) this context's sandbox from now on."""
        mapping = _SANDBOXES.get().copy()
        if box is None:
            mapping.pop(self, None)
        else:
            mapping[self] = box
        _SANDBOXES.set(MappingProxyType(mapping) if mapping else _EMPTY)

    @contextmanager
    def bind(self, box: B) -> Iterator[B]:
        """Within the block, this context's sandbox is *box*."""
        mapping = _SANDBOXES.get().copy()
        mapping[self] = box
        token = _SANDBOXES.set(MappingProxyType(mapping))
        try:
            yield box
        finally:
            _SANDBOXES.reset(token)

    # ------------------------------------------------------------------ allowances

    def allow(self, target: T, box: B) -> T:
        """Let *target* use *box*; see :meth:`corral.sandbox.SandboxController.allow`."""
        self._allowed = True
        if isinstance(target, asyncio.Task):
            self._tasks[target] = box
            return target
        if isinstance(target, threading.Thread):
            self._threads[target] = box
            return target
        if isinstance(target, concurrent.futures.ProcessPoolExecutor):
            raise SandboxError(
                "a process pool cannot share a sandbox: its workers are other processes "
                "with their own connections; use a thread pool, or run that work outside "
                "the sandbox"
            )
        if isinstance(target, concurrent.futures.Executor):
            self._allow_executor(target, box)
            return target
        if callable(target):
            return self._wrap(target, box)  # type: ignore[return-value]
        raise TypeError(
            "allow() takes a threading.Thread, an asyncio.Task, a concurrent.futures "
            f"executor or a callable, not {type(target).__name__}"
        )

    def _wrap(self, fn: Callable[..., Any], box: B) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with self.bind(box):
                    return await fn(*args, **kwargs)

            return run_async

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.bind(box):
                return fn(*args, **kwargs)

        return run

    def _allow_executor(self, executor: concurrent.futures.Executor, box: B) -> None:
        # Executors copy no context into their workers; wrapping this instance's submit
        # (map() goes through it too) carries the sandbox with each job, and only while
        # the sandbox is open: revoke() puts the original method back.
        with self._lock:
            if id(executor) in self._executors:
                self._executors[id(executor)] = (executor, box)
                return
            original = executor.submit
            router = self

            def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
                entry = router._executors.get(id(executor))
                if entry is None or entry[1].closed:
                    return original(fn, *args, **kwargs)
                return original(router._wrap(fn, entry[1]), *args, **kwargs)

            executor.submit = submit  # type: ignore[method-assign]
            self._executors[id(executor)] = (executor, box)

    def share(self, box: B) -> None:
        """Every context without a sandbox of its own uses *box*."""
        self._shared = box

    def unshare(self, box: B | None = None) -> None:
        if box is None or self._shared is box:
            self._shared = None

    def revoke(self, box: B) -> None:
        """Forget every allowance and sharing of *box* (it is closing)."""
        if not self._allowed and self._shared is None:
            return  # the common case: nothing was ever allowed or shared
        with self._lock:
            for task in [t for t, b in self._tasks.items() if b is box]:
                del self._tasks[task]
            for thread in [t for t, b in self._threads.items() if b is box]:
                del self._threads[thread]
            for key, (executor, value) in list(self._executors.items()):
                if value is box:
                    del self._executors[key]
                    vars(executor).pop("submit", None)
            if self._shared is box:
                self._shared = None
