"""The run-scoped broker: server, blocking and asyncio clients, wire protocol.

``Broker`` serves a private Unix socket; ``Client``/``AsyncClient`` talk to it (or to
the Node ``ephemeral-broker``); ``corral.broker.protocol`` is the sans-IO wire layer.
"""

from __future__ import annotations

from corral.broker.client import Client
from corral.broker.client_async import AsyncClient
from corral.broker.server import Broker

__all__ = ["AsyncClient", "Broker", "Client"]
