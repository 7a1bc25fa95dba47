"""Fixtures of the Redis-only tests (the shared spec's are in tests/broker_spec)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from corral.broker.redis import RedisClient


@pytest.fixture
def run(redis_url: str) -> Iterator[str]:
    """A fresh run id on the test Redis; its keys are purged afterwards."""
    run_id = f"t-{uuid.uuid4().hex[:12]}"
    yield run_id
    with RedisClient(redis_url, run_id=run_id) as janitor:
        janitor.purge()
