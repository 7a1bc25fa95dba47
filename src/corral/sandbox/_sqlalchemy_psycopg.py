"""The SQLAlchemy adapter's controllers for ``postgresql+psycopg`` engines (sync and
asyncio): the psycopg sandbox over real connections from the engine's own pool copy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.sandbox import _psycopg_async, _psycopg_sync
from corral.sandbox._sqlalchemy import AsyncEngineSandbox, EngineHooks
from corral.sandbox._sqlalchemy_virtual import PsycopgAsyncVirtual, PsycopgVirtual

__all__ = ["EngineSandbox", "PsycopgAsyncEngineSandbox"]


class EngineSandbox(EngineHooks, _psycopg_sync._Controller):
    """A sandboxed SQLAlchemy ``Engine`` (``postgresql+psycopg``), sandboxed in place.

    :param engine: the application's engine; keep using it (and everything bound to it).
    :param max_idle: real connections kept between sandboxes (their pool is a copy of
        the engine's, made by ``engine.pool.recreate()``).
    :param options: ``mode``, ``lock_timeout``, ``checkout_timeout``,
        ``isolation_level``, ``check_deferred``: see :class:`corral.sandbox.PoolSandbox`.
    """

    _virtual_class = PsycopgVirtual

    def __init__(self, engine: Engine, *, max_idle: int = 4, **options: Any) -> None:
        super().__init__(**options)
        self._hook(engine, max_idle)

    def _take(self) -> Any:
        fairy = self._connect_real()
        real = fairy.dbapi_connection
        self._fairies[id(real)] = fairy
        return real

    def _give(self, real: Any) -> None:
        fairy = self._fairies.pop(id(real))
        self._keep_or_return(fairy, healthy=not (real.closed or real.broken))

    def _joined(self) -> None:
        if not self._initialized():
            self._keep_or_return(self._connect_real(), healthy=True)

    def checkout_sync(self) -> Any:
        return self._checkout(None)

    def checkin_sync(self, target: Any) -> None:
        if target._open_work():
            target._end(commit=False)
        target._checkin()

    def close(self) -> None:
        """Return the kept real connections (call before ``engine.dispose()``)."""
        self.close_idle()

    def discard_idle(self) -> None:
        """Close the real connections kept between sandboxes and the engine pool's idle
        ones: ``engine.dispose()``, which replaces the engine's pool (pool events move to
        the new pool). Connections checked out now stay open until they are returned."""
        self._discard_idle()


class PsycopgAsyncEngineSandbox(AsyncEngineSandbox, _psycopg_async._Controller):
    """A sandboxed ``AsyncEngine`` on ``postgresql+psycopg``."""

    _virtual_class = PsycopgAsyncVirtual

    def __init__(self, engine: AsyncEngine, *, max_idle: int = 4, **options: Any) -> None:
        super().__init__(**options)
        self._hook(engine, max_idle)

    async def _take(self) -> Any:
        fairy = await self._take_fairy()
        real = fairy.dbapi_connection.driver_connection  # type: ignore[union-attr]
        self._fairies[id(real)] = fairy
        return real

    async def _give(self, real: Any) -> None:
        fairy = self._fairies.pop(id(real))
        await self._give_fairy(fairy, healthy=not (real.closed or real.broken))

    async def checkout_async(self) -> Any:
        return await self._checkout(None)

    async def checkin_async(self, target: Any) -> None:
        if target._open_work():
            await target._end(commit=False)
        target._checkin()
