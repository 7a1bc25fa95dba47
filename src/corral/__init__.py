"""corral: make database test suites embarrassingly parallel.

The public API is re-exported here; everything else lives in private modules.
"""

from __future__ import annotations

from corral.broker import AsyncClient, Broker, Client
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
    "Broker",
    "BrokerError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "Client",
    "CorralError",
    "KeyNotFound",
    "SandboxError",
    "SandboxNotActive",
    "__version__",
]
