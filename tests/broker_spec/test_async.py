"""The asyncio clients behave like the blocking ones, on every backend that has the
operations; cancelling a waiting task never leaves it holding anything."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from corral.errors import BrokerTimeout, BrokerUnavailable, KeyNotFound, OnceFailed
from tests.broker_spec.conftest import (
    BACKENDS,
    Backend,
    async_client_class,
    client_class,
    needs,
)

_LIFECYCLE = {"close", "aclose", "connect"}


@pytest.mark.parametrize("name", BACKENDS)
def test_sync_and_async_clients_have_the_same_methods(name: str) -> None:
    sync, async_ = client_class(name), async_client_class(name)
    public = {m for m in dir(sync) if not m.startswith("_")} - _LIFECYCLE
    assert public <= set(dir(async_))
    for method in public:
        if not callable(getattr(sync, method)):
            continue
        sync_params = list(inspect.signature(getattr(sync, method)).parameters)
        async_params = list(inspect.signature(getattr(async_, method)).parameters)
        assert sync_params == async_params, method


@needs("get", "set", "delete", "keys")
@pytest.mark.asyncio
async def test_async_keys(backend: Backend) -> None:
    async with backend.async_client() as client:
        await client.set("k", {"v": [1]}, ttl=60)
        assert await client.get("k") == {"v": [1]}
        assert await client.keys() == ["k"]
        assert await client.delete("k") is True
        with pytest.raises(KeyNotFound):
            await client.get("k")
        with pytest.raises(TypeError):
            await client.set("k", {1}, ttl=60)


@needs("once", "incr")
@pytest.mark.asyncio
async def test_async_once_accepts_an_async_compute(backend: Backend) -> None:
    async with backend.async_client() as a, backend.async_client() as b:
        calls: list[int] = []

        async def compute() -> str:
            calls.append(1)
            await asyncio.sleep(0.1)
            return "template"

        values = await asyncio.gather(
            a.once("setup", compute, ttl=60, timeout=10), b.once("setup", compute, timeout=10)
        )
        assert list(values) == ["template", "template"]
        assert calls == [1]

        async def explode() -> None:
            raise ValueError("bad schema")

        with pytest.raises(ValueError, match="bad schema"):
            await a.once("broken", explode)
        with pytest.raises(OnceFailed, match="bad schema"):
            await b.once("broken", compute)


@needs("lock")
@pytest.mark.asyncio
async def test_async_lock_excludes_and_cancelled_waiters_get_nothing(backend: Backend) -> None:
    async with backend.async_client() as a, backend.async_client() as b:
        async with a.lock("l") as token:
            assert token >= 1
            with pytest.raises(BrokerTimeout):
                async with b.lock("l", timeout=0.1):
                    pass

            async def wait() -> None:
                async with b.lock("l", timeout=30):
                    pytest.fail("a cancelled waiter must never get the lock")

            task = asyncio.ensure_future(wait())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with b.lock("l", timeout=0):  # free: the cancelled ticket was withdrawn
            pass


@needs("pool", "acquire", "push", "pop", "barrier", "throttle", "add", "status")
@pytest.mark.asyncio
async def test_async_pool_queue_barrier(backend: Backend) -> None:
    async with backend.async_client() as a, backend.async_client() as b:
        assert await a.pool("dbs", ["db-1"]) is True
        async with a.acquire("dbs") as item:
            assert item == "db-1"
            with pytest.raises(BrokerTimeout):
                async with b.acquire("dbs", timeout=0.1):
                    pass
        popped = asyncio.ensure_future(b.pop("q", timeout=10))
        await asyncio.sleep(0.05)
        assert await a.push("q", "job") == 1
        assert await popped == "job"
        assert sorted(await asyncio.gather(a.barrier("x", 2), b.barrier("x", 2))) == [0, 1]
        await a.throttle("t", 10)
        assert await a.add("once-only", 1) is True
        assert await b.add("once-only", 2) is False
        status: dict[str, Any] = await a.status()
        assert status["holders"] == []


@needs("lock", "status")
@pytest.mark.asyncio
async def test_aclose_ends_a_wait_in_progress(backend: Backend) -> None:
    async with backend.async_client() as holder:
        waiter = backend.async_client()
        async with holder.lock("l"):

            async def wait() -> None:
                async with waiter.lock("l", timeout=30):
                    pass

            task = asyncio.ensure_future(wait())
            for _ in range(500):
                if [w for w in (await holder.status())["waiters"] if w["name"] == "l"]:
                    break
                await asyncio.sleep(0.01)
            await waiter.aclose()
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(task, 10)
        async with holder.lock("l", timeout=0):
            pass
