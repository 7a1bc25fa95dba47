"""The Lua scripts load, carry the helpers they call, and undo interrupted claims."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import pytest

from corral.broker.redis import AsyncRedisClient, RedisClient
from corral.broker.redis._scripts import helpers, scripts
from corral.errors import BrokerTimeout, BrokerUnavailable


def test_every_script_compiles_in_redis(redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        for name, source in scripts().items():
            assert r.script_load(source), name  # a Lua syntax error raises here
    finally:
        r.close()


@pytest.mark.parametrize("name", sorted(scripts()))
def test_every_called_helper_is_defined_before_the_body(name: str) -> None:
    source = scripts()[name]
    defined = re.findall(r"^local function (\w+)\(", source, re.M)
    assert len(defined) == len(set(defined))
    for helper in helpers():
        if re.search(rf"(?<![\w.:]){helper}\(", source):
            assert helper in defined, f"{name} calls {helper} without defining it"


def test_key_value_scripts_carry_no_coordination_helpers() -> None:
    for name in ("set", "delete", "keys", "incr", "push", "stats", "throttle"):
        assert "local function" not in scripts()[name], name


def test_a_computer_interrupted_by_ctrl_c_hands_the_claim_on(redis_url: str, run: str) -> None:
    computer = RedisClient(redis_url, run_id=run, session_ttl=1.5)
    waiter = RedisClient(redis_url, run_id=run, session_ttl=1.5)
    started, results = threading.Event(), []

    def interrupted() -> Any:
        started.set()
        waiter_queued.wait(10)
        raise KeyboardInterrupt

    waiter_queued = threading.Event()

    def compute_in_thread() -> None:
        try:
            computer.once("setup", interrupted)
        except KeyboardInterrupt:
            results.append("interrupted")

    thread = threading.Thread(target=compute_in_thread)
    thread.start()
    assert started.wait(10)
    other = threading.Thread(
        target=lambda: results.append(waiter.once("setup", lambda: "by the waiter", timeout=30))
    )
    other.start()
    while not [w for w in waiter.status()["waiters"] if w["kind"] == "once"]:
        threading.Event().wait(0.01)
    waiter_queued.set()
    thread.join(10)
    other.join(10)
    assert sorted(results) == ["by the waiter", "interrupted"]
    computer.close()
    waiter.close()


@pytest.mark.asyncio
async def test_a_cancelled_once_waiter_is_never_elected(redis_url: str, run: str) -> None:
    async with (
        AsyncRedisClient(redis_url, run_id=run, session_ttl=1.5) as computer,
        AsyncRedisClient(redis_url, run_id=run, session_ttl=1.5) as waiter,
        AsyncRedisClient(redis_url, run_id=run, session_ttl=1.5) as later,
    ):
        release = asyncio.Event()

        async def slow() -> str:
            await release.wait()
            raise RuntimeError("gave up")

        computing = asyncio.ensure_future(computer.once("v", slow))
        await asyncio.sleep(0.05)
        cancelled = asyncio.ensure_future(waiter.once("v", lambda: "never"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (await later.status())["waiters"] == []
        computing.cancel()  # not a failure: the claim is handed on (to nobody) and cleared
        with pytest.raises(asyncio.CancelledError):
            await computing
        assert await later.once("v", lambda: "fresh", timeout=5) == "fresh"


def test_lock_timeout_zero_does_not_queue(redis_url: str, run: str) -> None:
    with (
        RedisClient(redis_url, run_id=run) as a,
        RedisClient(redis_url, run_id=run) as b,
        a.lock("l"),
    ):
        with pytest.raises(BrokerTimeout), b.lock("l", timeout=0):
            pass
        assert a.status()["waiters"] == []


@pytest.mark.asyncio
async def test_a_closed_async_client_says_so(redis_url: str, run: str) -> None:
    client = AsyncRedisClient(redis_url, run_id=run)
    await client.set("k", 1)
    await client.aclose()
    await client.aclose()  # idempotent
    for call in (client.ping(), client.get("k"), client.purge()):
        with pytest.raises(BrokerUnavailable, match="closed"):
            await call
