"""The broker client API on Redis, for runs that span machines: RedisClient, AsyncRedisClient.

Same methods as :class:`~corral.broker.Client` plus the coordination of issue 5, with keys
under a run-scoped prefix and ownership tied to a heartbeated session (``docs/redis.md``).
``Client("redis://...")`` and ``$CORRAL_BROKER_URL`` return these clients too.
"""

from __future__ import annotations

from corral.broker._address import is_redis_url
from corral.broker.redis._async import AsyncRedisClient
from corral.broker.redis._base import DEFAULT_SESSION_TTL
from corral.broker.redis._sync import RedisClient

__all__ = ["DEFAULT_SESSION_TTL", "AsyncRedisClient", "RedisClient", "is_redis_url"]
