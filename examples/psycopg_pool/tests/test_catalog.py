"""Products and stock, each test in its own rolled-back transaction."""

from __future__ import annotations

import pytest
from inventory import catalog


def test_seed_data_from_the_schema_is_there() -> None:
    assert [p.sku for p in catalog.list_products()] == ["HOUSE-MUG", "HOUSE-TEE"]
    assert catalog.get_product("HOUSE-MUG").on_hand == 100


def test_add_product_with_initial_stock() -> None:
    product = catalog.add_product("LAMP-1", "Desk lamp", 3500, on_hand=5)
    assert (product.sku, product.price_cents, product.on_hand) == ("LAMP-1", 3500, 5)
    assert catalog.movements("LAMP-1") == [(5, "initial stock")]


@pytest.mark.parametrize("attempt", range(10))
def test_the_same_sku_in_every_test_never_collides(attempt: int) -> None:
    # Ten tests (spread over the workers) insert the same unique SKU: each sees only its own.
    catalog.add_product("SAME-SKU", f"attempt {attempt}", 100)
    assert [p.name for p in catalog.list_products() if p.sku == "SAME-SKU"] == [
        f"attempt {attempt}"
    ]


def test_duplicate_sku_fails_only_its_own_transaction() -> None:
    catalog.add_product("DUP-1", "first", 100)
    with pytest.raises(catalog.DuplicateSku):
        catalog.add_product("DUP-1", "second", 200)
    # The failed transaction became a rolled-back savepoint: the test goes on.
    assert catalog.get_product("DUP-1").name == "first"
    catalog.add_product("DUP-2", "third", 300)
    assert len(catalog.list_products()) == 4


@pytest.mark.parametrize(
    ("sku", "price"),
    [("lowercase", 100), ("X", 100), ("NEG-PRICE", -1)],
)
def test_invalid_products_are_refused(sku: str, price: int) -> None:
    with pytest.raises(ValueError, match="invalid product"):
        catalog.add_product(sku, "bad", price)
    with pytest.raises(catalog.UnknownProduct):
        catalog.get_product(sku)


def test_receive_stock_records_a_movement(new_product) -> None:
    product = new_product(on_hand=3)
    assert catalog.receive(product.sku, 7) == 10
    assert catalog.movements(product.sku) == [(3, "initial stock"), (7, "delivery")]


def test_receive_refuses_nothing(new_product) -> None:
    product = new_product()
    with pytest.raises(ValueError, match="positive"):
        catalog.receive(product.sku, 0)


def test_low_stock(new_product) -> None:
    few = new_product(on_hand=2)
    new_product(on_hand=50)
    assert catalog.low_stock(5) == [few.sku]


def test_now_is_frozen_inside_a_test(new_product) -> None:
    # created_at defaults to now(): the transaction's start, the same for the whole test.
    # (stock_movement.at uses clock_timestamp() where the app needs the wall clock.)
    first, second = new_product(), new_product()
    from inventory.db import pool

    with pool.connection() as conn:
        stamps = conn.execute(
            "SELECT created_at FROM product WHERE sku = ANY(%s)", [[first.sku, second.sku]]
        ).fetchall()
    assert stamps[0] == stamps[1]
