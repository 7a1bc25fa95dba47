"""The SQLAlchemy adapter's controller for ``postgresql+asyncpg`` engines: the asyncpg
sandbox over real connections from the engine's own pool copy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from corral.sandbox import _asyncpg
from corral.sandbox._sqlalchemy import AsyncEngineSandbox
from corral.sandbox._sqlalchemy_virtual import AsyncpgVirtual
from corral.sandbox._targets import asyncpg_socket

__all__ = ["AsyncpgEngineSandbox"]


class AsyncpgEngineSandbox(AsyncEngineSandbox, _asyncpg.AsyncpgSandboxBase):
    """A sandboxed ``AsyncEngine`` on ``postgresql+asyncpg``."""

    _virtual_class = AsyncpgVirtual

    def __init__(self, engine: AsyncEngine, *, max_idle: int = 4, **options: Any) -> None:
        super().__init__(**options)
        self._reals: dict[int, _asyncpg._Real] = {}
        self._hook(engine, max_idle)

    def _connect_real_driver(self, dialect: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        # An engine on the plugin's throwaway server by TCP (a URL built from parts has
        # no socket directory in its query): the sandboxes' connections take the socket.
        dsn = cargs[0] if cargs and isinstance(cargs[0], str) else None
        socket = asyncpg_socket(dsn, cparams)
        if socket is None:
            return None
        directory, port = socket
        return dialect.connect(*cargs, **{**cparams, "host": directory, "port": port})

    async def _take(self) -> _asyncpg._Real:
        fairy = await self._take_fairy()
        driver = fairy.dbapi_connection.driver_connection  # type: ignore[union-attr]
        real = self._reals.get(id(driver))
        if real is None or real.conn is not driver:
            # Kept with the connection, so its prepared statements serve the next tests.
            real = self._reals[id(driver)] = _asyncpg._Real(driver)
        self._fairies[id(real)] = fairy
        return real

    async def _give(self, real: _asyncpg._Real, *, rolled_back: bool = False) -> None:
        fairy = self._fairies.pop(id(real))
        healthy = rolled_back or not _asyncpg._closed(real.conn)
        if not healthy:
            self._reals.pop(id(real.conn), None)
        await self._give_fairy(fairy, healthy=healthy)

    def _unkeep(self) -> list[Any]:
        # Forget the kept connections' prepared-statement holders too (not those in use).
        self._reals = {k: r for k, r in self._reals.items() if id(r) in self._fairies}
        return super()._unkeep()

    async def checkout_async(self) -> Any:
        return await self._checkout(None)

    async def checkin_async(self, target: Any) -> None:
        await self._checkin(target)
