"""The run-scoped broker: server, blocking and asyncio clients, wire protocol.

``Broker`` serves a private Unix socket; ``Client``/``AsyncClient`` talk to it (or to
the Node ``ephemeral-broker``); ``corral.broker.protocol`` is the sans-IO wire layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral._lazy import lazy_exports

if TYPE_CHECKING:
    from corral.broker.client import Client
    from corral.broker.client_async import AsyncClient
    from corral.broker.server import Broker

__all__ = ["AsyncClient", "Broker", "Client"]

# Imported at first use: a worker needs the blocking client and never the server.
_LAZY = {
    "AsyncClient": "corral.broker.client_async",
    "Broker": "corral.broker.server",
    "Client": "corral.broker.client",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
