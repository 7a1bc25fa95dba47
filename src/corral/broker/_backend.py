"""Which backend a client's address names: ``Client("redis://...")``, and ``Client()`` or
``AsyncClient()`` with ``$CORRAL_BROKER_URL`` set, are the Redis clients (issue 9).

A module of its own, imported by the two public client modules only: the Redis backend
builds on the client API (:mod:`._api_async`), so the API cannot be what imports it.
"""

from __future__ import annotations

import os
from typing import Any

from corral._lifecycle import AsyncClosing
from corral.broker._address import wants_redis

__all__ = ["RedisSwitch"]


class RedisSwitch:
    """A base of :class:`~corral.broker.Client` and :class:`~corral.broker.AsyncClient`:
    for a Redis address (a redis:// URL, or $CORRAL_BROKER_URL when no path is given: it
    takes precedence over EPHEMERAL_PIPE) they make the Redis client instead; their
    subclasses stay socket clients. The Redis backend is imported only then."""

    def __new__(cls, path: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        if RedisSwitch not in cls.__bases__ or not wants_redis(path):
            return super().__new__(cls)
        from corral.broker import redis

        client = redis.AsyncRedisClient if issubclass(cls, AsyncClosing) else redis.RedisClient
        return client(path if isinstance(path, str) else None, *args, **kwargs)
