"""Broker fixtures: real brokers on private sockets, and clients connected to them.

``make_broker(**options)`` starts as many brokers as a test needs and stops them all
afterwards; ``broker`` is one with TTLs optional; ``client`` is connected to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral.broker import Broker, Client


@pytest.fixture
def make_broker() -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def make(**options: Any) -> Broker:
        broker = Broker(**options)
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in reversed(started):
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., Broker]) -> Broker:
    return make_broker(require_ttl=False)


@pytest.fixture
def client(broker: Broker) -> Iterator[Client]:
    with Client(broker.path) as c:
        yield c
