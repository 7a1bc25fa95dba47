"""Fixtures: an HTTP client on the app (httpx's ASGI transport), and data made through it.

corral's plugin has given this process its own database (``DATABASE_URL``) before this
file imports the app, and opens a sandbox on the app's engine before every test: data
these fixtures create goes into the test's transaction and is rolled back after it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from blog.api import app, get_notifier

_emails = itertools.count(1)
Json = dict[str, Any]


class RecordingNotifier:
    """Stands in for the mail-sending notifier (a FastAPI dependency override)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def notify(self, email: str, message: str) -> None:
        self.sent.append((email, message))


@pytest.fixture
def notifier() -> RecordingNotifier:
    return RecordingNotifier()


@pytest.fixture
async def client(notifier: RecordingNotifier) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_notifier] = lambda: notifier
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://blog.test") as client:
            yield client
    finally:
        app.dependency_overrides.clear()


@pytest.fixture
def make_user(client: httpx.AsyncClient) -> Callable[..., Awaitable[Json]]:
    async def make(name: str = "Ada", email: str | None = None) -> Json:
        email = email or f"user{next(_emails)}@example.com"
        response = await client.post("/users", json={"email": email, "name": name})
        assert response.status_code == 201, response.text
        return response.json()

    return make


@pytest.fixture
def make_post(client: httpx.AsyncClient) -> Callable[..., Awaitable[Json]]:
    async def make(author: Json, title: str = "Hello", **fields: Any) -> Json:
        body = {"author_id": author["id"], "title": title, "body": "Text.", **fields}
        response = await client.post("/posts", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    return make


@pytest.fixture
async def author(make_user: Callable[..., Awaitable[Json]]) -> Json:
    return await make_user(name="Author")
