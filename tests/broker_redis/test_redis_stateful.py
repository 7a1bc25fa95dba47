"""Hypothesis drives pools, leases and counters on a real Redis against a plain model:
random takes, releases, non-blocking acquires and client closes (session ends)."""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.broker.redis import RedisClient
from corral.errors import BrokerTimeout, LeaseError

ITEMS = ["db-0", "db-1", "db-2"]
CLIENTS = 3


@pytest.fixture
def machine(redis_url: str) -> type[RuleBasedStateMachine]:
    class PoolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.run = f"h-{uuid.uuid4().hex[:12]}"
            self.clients = [self._client() for _ in range(CLIENTS)]
            self.clients[0].pool("dbs", ITEMS)
            # model: per client, the (context manager, item) pairs it holds
            self.held: list[list[tuple[AbstractContextManager[Any], str]]] = [
                [] for _ in range(CLIENTS)
            ]
            self.leases: dict[str, tuple[int, int]] = {}  # worker -> (client, number)
            self.lease_key: dict[str, str] = {}  # worker -> key
            self.total = 0

        def _client(self) -> RedisClient:
            return RedisClient(redis_url, run_id=self.run, session_ttl=30)

        @rule(c=st.integers(0, CLIENTS - 1))
        def acquire(self, c: int) -> None:
            ctx = self.clients[c].acquire("dbs", timeout=0)
            in_use = sum(len(h) for h in self.held)
            if in_use == len(ITEMS):
                with pytest.raises(BrokerTimeout):
                    ctx.__enter__()
                return
            item = ctx.__enter__()
            assert item in ITEMS
            assert item not in {i for h in self.held for _, i in h}
            self.held[c].append((ctx, item))

        @precondition(lambda self: any(self.held))
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            c = data.draw(st.sampled_from([i for i, h in enumerate(self.held) if h]))
            ctx, _ = self.held[c].pop(data.draw(st.integers(0, len(self.held[c]) - 1)))
            ctx.__exit__(None, None, None)

        @rule(c=st.integers(0, CLIENTS - 1))
        def close_client(self, c: int) -> None:
            # A clean close ends the session: everything the client held is free at once.
            self.clients[c].close()
            self.held[c] = []
            self.leases = {w: v for w, v in self.leases.items() if v[0] != c}
            self.lease_key = {w: k for w, k in self.lease_key.items() if w in self.leases}
            self.clients[c] = self._client()

        @rule(c=st.integers(0, CLIENTS - 1), worker=st.sampled_from(["w1", "w2", "w3"]),
              key=st.sampled_from(["a", "b"]))  # fmt: skip
        def lease(self, c: int, worker: str, key: str) -> None:
            current = self.leases.get(worker)
            if current is not None and self.lease_key[worker] != key:
                with pytest.raises(LeaseError):
                    self.clients[c].lease(key, worker, ttl=60)
                return
            number = self.clients[c].lease(key, worker, ttl=60)
            if current is not None:
                assert number == current[1]  # a renewal keeps the number
            else:
                taken = {n for w, (_, n) in self.leases.items() if self.lease_key[w] == key}
                assert number == min(set(range(len(taken) + 1)) - taken)
            self.leases[worker] = (c, number)
            self.lease_key[worker] = key

        @rule(c=st.integers(0, CLIENTS - 1), amount=st.integers(-5, 5))
        def incr(self, c: int, amount: int) -> None:
            self.total += amount
            assert self.clients[c].incr("total", amount) == self.total

        @invariant()
        def redis_agrees(self) -> None:
            status = self.clients[0].status()
            pool = sorted(h["item"] for h in status["holders"] if h["kind"] == "pool")
            assert len(pool) == sum(len(h) for h in self.held)
            leased = {h["worker"]: h["item"] for h in status["holders"] if h["kind"] == "lease"}
            assert leased == {w: n for w, (_, n) in self.leases.items()}
            assert status["waiters"] == []

        def teardown(self) -> None:
            for client in self.clients:
                client.purge()
                client.close()

    return PoolMachine


def test_pools_leases_and_counters_follow_the_model(machine: type[RuleBasedStateMachine]) -> None:
    test = machine.TestCase
    test.settings = settings(
        max_examples=15,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    test().runTest()
