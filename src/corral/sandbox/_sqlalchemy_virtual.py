"""The driver connections SQLAlchemy's pool holds while an engine is sandboxed.

A pool keeps a DBAPI connection for many checkouts; a sandbox lives for one test. So the
pool holds a *virtual* connection: at each checkout it binds to the current context's
sandbox (a corral proxy of the sandbox's one real connection, taking its checkout lock),
and at checkin it lets go. Its own settings (autocommit, isolation level...) persist across
checkouts, as a real connection's would.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Protocol

__all__ = ["AsyncpgVirtual", "Hooks", "PsycopgAsyncVirtual", "PsycopgVirtual", "Virtual"]


class Hooks(Protocol):
    """Where a virtual connection finds its sandbox (the engine's controller,
    :class:`~._sqlalchemy.EngineHooks`, which imports this module)."""

    def checkout_sync(self) -> Any: ...
    async def checkout_async(self) -> Any: ...
    def checkin_sync(self, target: Any) -> None: ...
    async def checkin_async(self, target: Any) -> None: ...


class Virtual:
    """What the pool holds instead of a driver connection (never a real connection)."""

    #: settings the app (or SQLAlchemy) makes on the connection, kept across checkouts
    _SETTINGS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, hooks: Hooks) -> None:
        object.__setattr__(self, "_hooks", hooks)
        object.__setattr__(self, "_target", None)
        object.__setattr__(self, "_settings", {})

    # ------------------------------------------------------------------ binding

    def _live(self) -> Any:
        target = self._target
        return None if target is None or target.closed else target

    def _bind(self) -> Any:
        """The proxy this checkout uses; checked out on first need (sync callers).

        A proxy whose sandbox closed under this checkout stays: its calls say so,
        rather than silently moving the checkout into another sandbox.
        """
        target = self._target
        if target is None:
            target = self._hooks.checkout_sync()
            self._apply(target)
            object.__setattr__(self, "_target", target)
        return target

    async def _abind(self) -> Any:
        """:meth:`_bind` for callers already inside a coroutine."""
        target = self._target
        if target is None:
            target = await self._hooks.checkout_async()
            self._apply(target)
            object.__setattr__(self, "_target", target)
        return target

    def _apply(self, target: Any) -> None:
        """Carry this connection's settings over to a new checkout's proxy."""

    def _unbind(self) -> None:
        """The pool took the connection back: end the app's transaction, free the sandbox."""
        target, self.__dict__["_target"] = self._target, None
        if target is not None:
            self._hooks.checkin_sync(target)

    async def _aunbind(self) -> None:
        target, self.__dict__["_target"] = self._target, None
        if target is not None:
            await self._hooks.checkin_async(target)

    # ------------------------------------------------------------------ forwarding

    def __getattr__(self, name: str) -> Any:
        if name in self._SETTINGS and self._live() is None:
            return self._settings.get(name)
        return getattr(self._bind(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._SETTINGS:
            self._settings[name] = value
        setattr(self._bind(), name, value)

    def __repr__(self) -> str:
        return f"<corral virtual connection of {self._hooks!r} bound to {self._target!r}>"


class PsycopgVirtual(Virtual):
    """Stands in for a ``psycopg.Connection`` (``postgresql+psycopg``, sync)."""

    _SETTINGS = frozenset({"autocommit", "isolation_level", "read_only", "deferrable"})

    def _apply(self, target: Any) -> None:
        s = self._settings
        target._app.autocommit = bool(s.get("autocommit", target._app.autocommit))
        target._app.read_only = s.get("read_only")
        target._isolation_level = s.get("isolation_level")
        target._deferrable = s.get("deferrable")

    @property
    def closed(self) -> bool:
        target = self._target
        return bool(target is not None and target.broken)

    @property
    def broken(self) -> bool:
        return self.closed

    def add_notice_handler(self, callback: Any) -> None:
        # The dialect installs its notice logger on every new connection; the sandbox's
        # real connection was made by the same engine and already has it.
        return None

    def close(self) -> None:
        self._unbind()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._bind().cursor(*args, **kwargs)

    def commit(self) -> None:
        self._bind().commit()

    def rollback(self) -> None:
        if self._live() is not None:
            self._bind().rollback()


class PsycopgAsyncVirtual(PsycopgVirtual):
    """Stands in for a ``psycopg.AsyncConnection`` (``postgresql+psycopg`` async)."""

    async def _set(self, name: str, value: Any) -> None:
        self._settings[name] = value
        await getattr(await self._abind(), f"set_{name}")(value)

    async def set_autocommit(self, value: bool) -> None:
        await self._set("autocommit", value)

    async def set_isolation_level(self, value: Any) -> None:
        await self._set("isolation_level", value)

    async def set_read_only(self, value: bool | None) -> None:
        await self._set("read_only", value)

    async def set_deferrable(self, value: bool | None) -> None:
        await self._set("deferrable", value)

    async def close(self) -> None:  # type: ignore[override]
        await self._aunbind()

    async def commit(self) -> None:  # type: ignore[override]
        await (await self._abind()).commit()

    async def rollback(self) -> None:  # type: ignore[override]
        if self._live() is not None:
            await (await self._abind()).rollback()


def _bound_in_coroutine(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """A coroutine method that binds the virtual connection (:meth:`Virtual._abind`), then
    awaits the bound proxy's method *name*."""

    async def method(self: Virtual, *args: Any, **kwargs: Any) -> Any:
        return await getattr(await self._abind(), name)(*args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"AsyncpgVirtual.{name}"
    return method


class AsyncpgVirtual(Virtual):
    """Stands in for an ``asyncpg.Connection`` (``postgresql+asyncpg``).

    SQLAlchemy keeps the transaction settings in its own adapter and passes them to
    ``transaction()``, so nothing needs to persist here.
    """

    def is_closed(self) -> bool:
        # A dead sandbox connection reads as a closed one, so SQLAlchemy invalidates
        # this pool entry and the next checkout reports the broken sandbox clearly.
        target = self._target
        return bool(target is not None and target._box.broken is not None)

    async def close(self, *, timeout: float | None = None) -> None:
        await self._aunbind()

    def terminate(self) -> None:
        self._unbind()

    async def set_type_codec(self, *args: Any, **kwargs: Any) -> None:
        # The dialect's codecs were installed on the sandbox's real connection when the
        # same engine made it; installing them again per checkout costs a query each.
        return None

    # The dialect calls these from coroutines it awaits (e.g. its pre-ping runs before the
    # checkout event), where a sync bind could not wait for the sandbox: bind here.

    def transaction(self, **options: Any) -> _LazyTransaction:
        target = self._target
        if target is not None:
            return target.transaction(**options)  # type: ignore[no-any-return]
        return _LazyTransaction(self, options)

    execute = _bound_in_coroutine("execute")
    executemany = _bound_in_coroutine("executemany")
    fetch = _bound_in_coroutine("fetch")
    fetchrow = _bound_in_coroutine("fetchrow")
    fetchval = _bound_in_coroutine("fetchval")
    prepare = _bound_in_coroutine("prepare")
    reload_schema_state = _bound_in_coroutine("reload_schema_state")


class _LazyTransaction:
    """``transaction()`` of a not yet bound virtual connection: binds when started."""

    def __init__(self, virtual: AsyncpgVirtual, options: dict[str, Any]) -> None:
        self._virtual = virtual
        self._options = options
        self._real: Any = None

    async def start(self) -> None:
        self._real = (await self._virtual._abind()).transaction(**self._options)
        await self._real.start()

    async def commit(self) -> None:
        await self._real.commit()

    async def rollback(self) -> None:
        await self._real.rollback()

    async def __aenter__(self) -> _LazyTransaction:
        await self.start()
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        await self._real.__aexit__(et, e, tb)
