"""``with`` and ``async with`` for corral's objects: a client closes on the way out; a
server (the broker, a throwaway PostgreSQL) starts on the way in and stops on the way out.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncClosing", "Closing", "Running"]


class Closing:
    """``with client:`` closes it on the way out (every blocking broker client)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClosing:
    """``async with client:`` closes it on the way out (every asyncio broker client)."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Running(Closing, AsyncClosing):
    """``with server:`` starts it and stops it on the way out; ``async with server:``
    does both on a worker thread, so the event loop keeps running meanwhile."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The same as :meth:`stop`."""
        self.stop()

    async def aclose(self) -> None:
        """:meth:`stop` on a worker thread."""
        import asyncio  # here: the blocking users of this module never need it

        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    async def __aenter__(self) -> Self:
        import asyncio

        await asyncio.to_thread(self.start)
        return self
