"""What the clients of both backends share: public methods over each backend's hook.

The blocking twin, :mod:`._common_sync`, is generated from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["AsyncOnceAPI"]


class AsyncOnceAPI:
    """``once``, the same on both backends; each computes through its ``_once``."""

    async def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of *key*, computed by exactly one caller in the whole run.

        The first caller runs ``compute()`` (an async *compute* is awaited) and stores
        its JSON result under *key* for *ttl* seconds (``get(key)`` reads it); the others
        wait (up to *timeout* seconds) and get the same value. If *compute* raises, that
        caller gets its exception and every other caller (also later ones, for *ttl*)
        :class:`~corral.errors.OnceFailed` with the original message. If the computing
        process dies, one waiter is elected to compute instead.

        :raises OnceFailed: the computing caller's *compute* raised.
        :raises BrokerTimeout: the value was not ready within *timeout*.
        :raises TypeError: *compute* returned a value that is not JSON.
        """
        if not callable(compute):
            raise TypeError("compute must be callable")
        return await self._once(key, compute, ttl, timeout)

    async def _once(
        self, key: str, compute: Callable[[], Any], ttl: float | None, timeout: float | None
    ) -> Any:
        """Compute or wait for *key*'s value on this backend (*compute* is callable)."""
        raise NotImplementedError
