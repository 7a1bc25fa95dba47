from __future__ import annotations

import os

import httpx
import pytest
from shop.settings import get_settings
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.anyio


async def test_the_settings_point_at_this_process_database(client: httpx.AsyncClient) -> None:
    url = make_url(os.environ["CORRAL_DATABASE_URL"])
    assert get_settings().name == url.database


@pytest.mark.parametrize("n", range(4))
async def test_every_test_starts_empty(client: httpx.AsyncClient, n: int) -> None:
    assert (await client.get("/products")).json() == {"count": 0}
    for i in range(n + 1):
        response = await client.post("/products", json={"sku": f"sku-{i}", "stock": 3})
        assert response.status_code == 201, response.text
    assert (await client.get("/products")).json() == {"count": n + 1}


async def test_an_order_takes_stock(client: httpx.AsyncClient) -> None:
    product = (await client.post("/products", json={"sku": "pen", "stock": 2})).json()
    assert (
        await client.post("/orders", json={"product_id": product["id"], "quantity": 2})
    ).status_code == 201
    response = await client.post("/orders", json={"product_id": product["id"], "quantity": 1})
    assert response.status_code == 409


async def test_a_duplicate_sku_leaves_the_app_working(client: httpx.AsyncClient) -> None:
    assert (await client.post("/products", json={"sku": "dup", "stock": 1})).status_code == 201
    assert (await client.post("/products", json={"sku": "dup", "stock": 1})).status_code == 409
    assert (await client.get("/products")).json() == {"count": 1}
