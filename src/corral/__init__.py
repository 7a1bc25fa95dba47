"""corral: make database test suites embarrassingly parallel.

The public API is re-exported here; everything else lives in private modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral._lazy import lazy_exports

if TYPE_CHECKING:
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

# Imported at first use, the errors too: the pytest plugin imports this package in every
# pytest run of the venv, most of which never talk to a broker nor meet an error of ours.
_LAZY = {
    "AsyncClient": "corral.broker",
    "AsyncRedisClient": "corral.broker.redis",
    "Broker": "corral.broker",
    "BrokerError": "corral.errors",
    "BrokerTimeout": "corral.errors",
    "BrokerUnavailable": "corral.errors",
    "Client": "corral.broker",
    "CorralError": "corral.errors",
    "KeyNotFound": "corral.errors",
    "RedisClient": "corral.broker.redis",
    "SandboxError": "corral.errors",
    "SandboxNotActive": "corral.errors",
    # `import corral` then `corral.errors.X`, as when the package imported it eagerly.
    "errors": "corral.errors",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
