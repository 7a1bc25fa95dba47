from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio


def test_psycopg_is_not_installed() -> None:
    with pytest.raises(ImportError):
        import psycopg  # noqa: F401


@pytest.mark.parametrize("n", range(4))
async def test_every_test_starts_empty(client: httpx.AsyncClient, n: int) -> None:
    assert (await client.get("/notes")).json()["total"] == 0
    for i in range(n + 1):
        response = await client.post("/notes", json={"title": f"note {i}"})
        assert response.status_code == 201, response.text
    assert (await client.get("/notes")).json()["total"] == n + 1


@pytest.mark.parametrize("n", range(2))
async def test_the_same_title_in_every_test(client: httpx.AsyncClient, n: int) -> None:
    assert (await client.post("/notes", json={"title": "same"})).status_code == 201
    assert (await client.post("/notes", json={"title": "same"})).status_code == 409
    assert (await client.get("/notes")).json()["total"] == 1
