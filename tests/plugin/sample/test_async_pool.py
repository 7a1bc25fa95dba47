from __future__ import annotations

from collections.abc import AsyncIterator

import apool  # type: ignore[import-not-found]
import pytest
import pytest_asyncio

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def opened() -> AsyncIterator[None]:
    # The app's lifespan: the pool opens once, on the session's loop.
    await apool.pool.open()
    yield
    await apool.pool.close()


@pytest.mark.parametrize("n", range(3))
async def test_session_loop_pool(opened: None, n: int) -> None:
    await apool.add_item("widget")
    assert await apool.names() == ["seed", "widget"]


@pytest.mark.no_sandbox
async def test_session_loop_pool_commits(opened: None) -> None:
    await apool.add_item("committed")
    assert await apool.names() == ["seed", "committed"]
