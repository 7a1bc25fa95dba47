"""corral: make database test suites embarrassingly parallel.

The public API is re-exported here; everything else lives in private modules.
"""

from __future__ import annotations

from corral.broker import AsyncClient, Broker, Client
from corral.broker.redis import AsyncRedisClient, RedisClient
from corral.errors import (
    BrokerError,
    BrokerTimeout,
    BrokerUnavailable,
    CorralError,
    KeyNotFound,
    SandboxError,
    SandboxNotActive,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncClient",
    "AsyncRedisClient",
    "Broker",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "Client",
    "CorralError",
    "KeyNotFound",
    "RedisClient",
    "SandboxError",
    "SandboxNotActive",
    "__version__",
]
