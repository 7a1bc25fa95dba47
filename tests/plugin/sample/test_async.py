from __future__ import annotations

import asyncio

import aapp  # type: ignore[import-not-found]
import app  # type: ignore[import-not-found]
import pytest
import pytest_asyncio


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(4))
async def test_async_insert_is_private(n: int) -> None:
    await aapp.add_item("widget")
    assert await aapp.names() == ["seed", "widget"]


@pytest.mark.asyncio
async def test_async_concurrent_queries_share_the_sandbox() -> None:
    await aapp.add_item("x")
    a, b = await asyncio.gather(aapp.names(), aapp.names())
    assert a == b == ["seed", "x"]


@pytest.mark.asyncio
async def test_sync_handle_from_async_test() -> None:
    app.add_item("widget")
    assert app.names() == ["seed", "widget"]


@pytest.mark.asyncio
async def test_async_broker_fixture(corral_async) -> None:
    await corral_async.set("k", 1, ttl=60)
    assert await corral_async.get("k") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_anyio_insert_is_private(anyio_backend: str) -> None:
    await aapp.add_item("widget")
    assert await aapp.names() == ["seed", "widget"]


@pytest_asyncio.fixture
async def gadget() -> str:
    # An async fixture writing through the async handle: inside the test's sandbox.
    await aapp.add_item("gadget")
    return "gadget"


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(2))
async def test_async_fixture_data_is_in_the_sandbox(gadget: str, n: int) -> None:
    await aapp.add_item("widget")
    assert await aapp.names() == ["seed", "gadget", "widget"]


@pytest.mark.asyncio(loop_scope="module")
async def test_module_scoped_loop() -> None:
    await aapp.add_item("widget")
    assert await aapp.names() == ["seed", "widget"]
