"""anyio tests through httpx's ASGI transport; corral's only line is sandbox(engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from shop.api import app
from shop.db import engine

from corral.sandbox import sandbox

engine_sandbox = sandbox(engine)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as c:
        yield c
