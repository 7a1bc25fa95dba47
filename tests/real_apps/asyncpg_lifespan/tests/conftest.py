"""The app's lifespan runs once for the session (its pool, sandboxed, serves every test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from notes.app import app


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def lifespan() -> AsyncIterator[None]:
    async with app.router.lifespan_context(app):
        yield


@pytest.fixture
async def client(lifespan: None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notes.test") as c:
        yield c
