"""The SQLAlchemy 2.x adapter: ``sandbox(engine)`` sandboxes an ``Engine`` or
``AsyncEngine`` in place, through documented hooks only.

- ``DialectEvents.do_connect`` makes the engine's pool hold virtual connections
  (:mod:`._sqlalchemy_virtual`) in sandbox mode: a handler may return the DBAPI
  connection itself. Async dialects make it with ``Dialect.connect()``, naming the
  driver-level connection through the ``async_creator_fn`` connect argument
  (``create_async_engine(async_creator=...)``) in a copy of the connect arguments: on
  SQLAlchemy 2.0 the ``cparams`` a handler gets are the engine's own, shared by every
  later connection (2.1 passes a copy).
- ``PoolEvents.checkout`` / ``checkin`` bind a virtual connection to the current
  context's sandbox and let go of it; a connection of the wrong kind for the mode
  (real in sandbox mode, virtual in normal mode) raises ``DisconnectionError``, which
  the pool answers with a fresh connection.
- The sandboxes' real connections come from ``engine.pool.recreate()``: the same
  creator, connect arguments and ``connect`` events (the dialect's setup) as the app's.

Everything bound to the engine (``Session(engine)``, ``sessionmaker``, ``AsyncSession``,
``engine.connect()``/``begin()``) then runs in the sandbox with no change.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool, PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

try:  # SQLAlchemy 2.0 and 2.1 (where it is the old name of await_, kept until 2.2)
    from sqlalchemy.util import await_only as await_
except ImportError:  # pragma: no cover - SQLAlchemy 2.2+
    from sqlalchemy.util import await_

from corral.errors import SandboxError
from corral.sandbox._controller import AsyncSandboxController, BaseController
from corral.sandbox._sqlalchemy_virtual import Virtual
from corral.sandbox._targets import Target, target

__all__ = ["AsyncEngineSandbox", "EngineHooks"]

logger = logging.getLogger("corral.sandbox.sqlalchemy")

#: Set while corral itself connects a sandbox's real connection (do_connect stays out).
_REAL: ContextVar[bool] = ContextVar("corral_sqlalchemy_real", default=False)
#: ``record.info`` key: a real connection made in sandbox mode (do_connect was bypassed).
_BYPASSED = "corral_bypassed_do_connect"
#: engine -> its controller: two controllers hooking one engine would fight over it.
_ENGINES: weakref.WeakKeyDictionary[Engine, EngineHooks] = weakref.WeakKeyDictionary()


def _retire(pool: Pool) -> None:
    """Close the connections still checked out of a disposed *pool* when they come back.

    ``Engine.dispose()`` / ``Pool.dispose()`` close the idle connections only; a checked
    out one goes back to the old pool and stays open until that pool is garbage
    collected (and the driver warns that it was never closed).
    """
    if not event.contains(pool, "checkin", _close_on_checkin):
        event.listen(pool, "checkin", _close_on_checkin)


def _close_on_checkin(dbapi_connection: Any, record: Any) -> None:
    if dbapi_connection is None:
        return  # already invalidated
    try:
        record.invalidate()
    except Exception as exc:  # e.g. returned by garbage collection, outside any loop
        logger.debug("closing a connection of a disposed pool: %s", exc)


class EngineHooks(BaseController[Any]):
    """The engine side, shared by the sync and async controllers: events, real pool."""

    _virtual_class: type[Virtual]

    def _hook(self, handle: Engine | AsyncEngine, max_idle: int) -> None:
        self.engine = handle
        self.sync_engine: Engine = handle.sync_engine if isinstance(handle, AsyncEngine) else handle
        existing = _ENGINES.get(self.sync_engine)
        if existing is not None:
            raise SandboxError(
                f"{self.sync_engine!r} is already sandboxed by {existing!r}: keep using that "
                "controller (create it once, e.g. at conftest import), or call its remove() "
                "first"
            )
        _ENGINES[self.sync_engine] = self
        self.max_idle = max_idle
        self._real_pool: Pool | None = None
        self._idle: list[PoolProxiedConnection] = []
        self._fairies: dict[int, PoolProxiedConnection] = {}
        self._installed = False
        if self.sandboxing:
            self._install()

    @property
    def mode(self) -> str:
        """``"sandbox"`` or ``"normal"``; switching to sandbox mode hooks the engine."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        BaseController.mode.fset(self, value)  # type: ignore[attr-defined]
        if self.sandboxing:
            self._install()

    def _install(self) -> None:
        if self._installed:
            return
        for name, handler in self._events():
            event.listen(self.sync_engine, name, handler)
        self._installed = True

    def _events(self) -> list[tuple[str, Callable[..., Any]]]:
        """The engine events this handle hooks: installed and removed as one list."""
        return [
            ("do_connect", self._on_do_connect),
            ("checkout", self._on_checkout),
            ("checkin", self._on_checkin),
            ("engine_disposed", self._on_disposed),
            ("connect", self._on_connect),
        ]

    def remove(self) -> None:
        """Unhook the engine: it is a plain engine again (close() the kept connections)."""
        if _ENGINES.get(self.sync_engine) is self:
            del _ENGINES[self.sync_engine]
        if self._installed:
            for name, handler in self._events():
                event.remove(self.sync_engine, name, handler)
            self._installed = False
        self._mode = "normal"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.sync_engine!r} mode={self.mode}>"

    def _target(self) -> Target | None:
        # What the dialect makes of the URL (connect_args given to create_engine are
        # the engine's own, out of reach; they rarely name another database).
        cargs, cparams = self.sync_engine.dialect.create_connect_args(self.sync_engine.url)
        dsn = cargs[0] if cargs and isinstance(cargs[0], str) else None
        return target(dsn, cparams)

    # ------------------------------------------------------------------ events

    def _on_do_connect(
        self, dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]
    ) -> Any:
        if _REAL.get():
            return self._connect_real_driver(dialect, cargs, cparams)
        if not self.sandboxing:
            return None
        if not dialect.is_async:
            return self._virtual_class(self)

        async def virtual(*args: Any, **kwargs: Any) -> Virtual:
            return self._virtual_class(self)

        # The documented async_creator mechanism: the dialect wraps what this returns
        # in its own adapter, exactly as for a real driver connection. In a copy: the
        # engine's own connect arguments must stay those of a real connection.
        params = {**cparams, "async_creator_fn": virtual}
        if dialect.driver == "asyncpg":
            # SQLAlchemy's per-connection statement cache would outlive the sandbox
            # that prepared them; corral keeps one per real connection instead.
            params["prepared_statement_cache_size"] = 0
        return dialect.connect(*cargs, **params)

    def _connect_real_driver(self, dialect: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        """The driver connection for a real connection of the sandboxes; None: the
        engine's own way (a dialect's controller may go another way to the same database)."""
        return None

    @staticmethod
    def _virtual_of(dbapi_connection: Any) -> Virtual | None:
        if isinstance(dbapi_connection, Virtual):
            return dbapi_connection
        driver = getattr(dbapi_connection, "driver_connection", None)
        return driver if isinstance(driver, Virtual) else None

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if _REAL.get():
            return
        virtual = self._virtual_of(dbapi_connection)
        if not self.sandboxing:
            if virtual is not None:
                raise sa_exc.DisconnectionError("corral: sandbox mode ended; reconnecting")
            return
        if virtual is None:
            if record is not None and record.info.get(_BYPASSED):
                raise SandboxError(
                    f"{self.sync_engine!r} makes its connections with creator= or "
                    "async_creator=, which bypasses the do_connect event corral sandboxes "
                    "an engine through, so this connection would commit for real. Create "
                    "the test engine from a URL (create_engine(url)), or sandbox the "
                    "driver-level pool that creator draws from instead."
                )
            raise sa_exc.DisconnectionError(
                "corral: a connection made before sandbox mode; replacing it"
            )
        virtual._bind()

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        if self.sandboxing and not _REAL.get() and self._virtual_of(dbapi_connection) is None:
            record.info[_BYPASSED] = True  # made in sandbox mode, yet real: a custom creator

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        virtual = self._virtual_of(dbapi_connection)
        if virtual is not None:
            virtual._unbind()

    def _on_disposed(self, conn: Any) -> None:
        # engine.dispose(): the sandboxes' pool goes too (only idle connections; one a
        # sandbox holds returns to the discarded pool and is closed there).
        self.close_idle()

    # ------------------------------------------------------------------ real connections

    def _connect_real(self) -> PoolProxiedConnection:
        if self._real_pool is None:
            self._real_pool = self.sync_engine.pool.recreate()
        while self._idle:
            fairy = self._idle.pop()
            if fairy.is_valid:
                return fairy
        token = _REAL.set(True)
        try:
            return self._real_pool.connect()
        finally:
            _REAL.reset(token)

    def _initialized(self) -> bool:
        """Whether the dialect has met the server (SQLAlchemy does at the first connect).

        A handle that joins another's sandbox may have made no connection of its own yet:
        SQLAlchemy would then run its dialect's setup queries on a virtual connection,
        which is no driver connection. One real connection first (kept for the next
        sandboxes) does it.
        """
        return self.sync_engine.dialect.server_version_info is not None

    def _keep_or_return(self, fairy: PoolProxiedConnection, healthy: bool) -> None:
        if healthy and len(self._idle) < self.max_idle:
            self._idle.append(fairy)  # the common case: kept, no pool event to keep out
            return
        token = _REAL.set(True)
        try:
            if not healthy:
                fairy.invalidate()
            fairy.close()
        finally:
            _REAL.reset(token)

    def close_idle(self) -> None:
        """Close the real connections kept between sandboxes, and their pool."""
        token = _REAL.set(True)
        try:
            while self._idle:
                self._idle.pop().close()
            pool, self._real_pool = self._real_pool, None
            if pool is not None:
                pool.dispose()
                _retire(pool)  # a sandbox's connection still out of it
        finally:
            _REAL.reset(token)

    def _discard_idle(self) -> None:
        """``discard_idle()``, sync side: corral's kept connections, then the engine's
        pool, replaced by ``engine.dispose()`` (pool events move to the new pool)."""
        self.close_idle()
        old = self.sync_engine.pool
        self.sync_engine.dispose()
        _retire(old)

    # ------------------------------------------------------------------ checkouts

    def checkout_sync(self) -> Any:
        raise NotImplementedError

    async def checkout_async(self) -> Any:
        raise NotImplementedError

    def checkin_sync(self, target: Any) -> None:
        raise NotImplementedError

    async def checkin_async(self, target: Any) -> None:
        raise NotImplementedError


class AsyncEngineSandbox(EngineHooks, AsyncSandboxController[Any]):
    """A sandboxed ``AsyncEngine``; its drivers' subclasses do the work.

    :param engine: the application's ``AsyncEngine``; keep using it, ``AsyncSession``
        and ``async_sessionmaker`` bound to it unchanged.

    Other parameters as :class:`EngineSandbox`.
    """

    _loop_bound: ClassVar[bool] = True  # SQLAlchemy's async adapters, whatever the driver

    async def _take_fairy(self) -> PoolProxiedConnection:
        while self._idle:  # the common case: no I/O, so no greenlet either
            fairy = self._idle.pop()
            if fairy.is_valid:
                return fairy
        return await greenlet_spawn(self._connect_real)

    def _unkeep(self) -> list[Any]:
        # The kept connections, and the pool they came from: its idle ones are of the
        # same loop. The next sandbox makes a new pool on the running loop.
        kept: list[Any] = [*self._idle, self._real_pool] if self._real_pool else [*self._idle]
        self._idle, self._real_pool = [], None
        return kept

    async def _close_kept(self, kept: list[Any]) -> None:
        def close() -> None:
            token = _REAL.set(True)
            try:
                for item in kept:
                    if isinstance(item, Pool):
                        item.dispose()
                        _retire(item)
                    else:
                        item.close()
            finally:
                _REAL.reset(token)

        await greenlet_spawn(close)

    async def _give_fairy(self, fairy: PoolProxiedConnection, healthy: bool) -> None:
        if healthy and len(self._idle) < self.max_idle:
            self._idle.append(fairy)  # no I/O, so no greenlet either
            return
        await greenlet_spawn(self._keep_or_return, fairy, healthy)

    async def _joined(self) -> None:
        if not self._initialized():
            # The kept connection belongs to this loop (the drivers' AsyncBoxController).
            await self._follow_loop()  # type: ignore[attr-defined]
            await self._give_fairy(await self._take_fairy(), healthy=True)

    def checkout_sync(self) -> Any:
        self._route().check()  # no sandbox here: say so, even where nothing can be awaited
        return await_(self.checkout_async())

    def checkin_sync(self, target: Any) -> None:
        try:
            await_(self.checkin_async(target))
        except sa_exc.MissingGreenlet:
            # Garbage collection returned the connection outside the event loop: no
            # I/O possible; the sandbox's close rolls everything back anyway.
            target._closed = True
            target._checkin()

    async def close(self) -> None:
        """Return the kept real connections (call before ``await engine.dispose()``)."""
        await greenlet_spawn(self.close_idle)

    async def discard_idle(self) -> None:
        """See :meth:`corral.sandbox.EngineSandbox.discard_idle` (``await engine.dispose()``)."""
        await greenlet_spawn(self._discard_idle)
