"""Orders against a module-level catalogue (created once, rolled back to for each test)."""

from __future__ import annotations

import threading

import pytest
from inventory import catalog, db, orders


def test_order_takes_items_out_of_stock(shop) -> None:
    order = orders.place_order("ada", {"PEN-BLUE": 3, "PAD-A5": 2})
    assert orders.order_total(order) == 3 * 150 + 2 * 450
    assert catalog.get_product("PEN-BLUE").on_hand == 37
    assert catalog.get_product("PAD-A5").on_hand == 10


def test_the_module_catalogue_is_back_for_every_test(shop) -> None:
    # The previous test took 3 pens; its changes were rolled back to the module's data.
    assert catalog.get_product("PEN-BLUE").on_hand == 40


def test_out_of_stock_writes_nothing(shop) -> None:
    with pytest.raises(orders.OutOfStock) as info:
        orders.place_order("bob", {"PEN-BLUE": 1, "INK-BLACK": 1})
    assert (info.value.sku, info.value.on_hand) == ("INK-BLACK", 0)
    # The pen line was written before the ink line failed: the app's rollback undid it.
    assert catalog.get_product("PEN-BLUE").on_hand == 40
    assert orders.revenue_by_customer() == {}


def test_unknown_sku(shop) -> None:
    with pytest.raises(catalog.UnknownProduct):
        orders.place_order("bob", {"NOPE-1": 1})


@pytest.mark.parametrize("lines", [{}, {"PEN-BLUE": 0}, {"PEN-BLUE": -2}])
def test_invalid_orders(shop, lines: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive quantity"):
        orders.place_order("bob", lines)


def test_cancel_puts_items_back(shop) -> None:
    order = orders.place_order("cy", {"PAD-A5": 12})
    assert catalog.low_stock(1) == ["INK-BLACK", "PAD-A5"]
    orders.cancel_order(order)
    assert orders.order_status(order) == "cancelled"
    assert catalog.get_product("PAD-A5").on_hand == 12
    assert [delta for delta, _ in catalog.movements("PAD-A5")] == [12, -12, 12]


def test_shipped_orders_cannot_be_cancelled(shop) -> None:
    order = orders.place_order("cy", {"PEN-BLUE": 1})
    orders.ship_order(order)
    with pytest.raises(orders.InvalidTransition, match="shipped"):
        orders.cancel_order(order)
    assert orders.order_status(order) == "shipped"


def test_revenue_ignores_cancelled_orders(shop) -> None:
    orders.place_order("ada", {"PEN-BLUE": 2})
    orders.place_order("bob", {"PAD-A5": 1})
    orders.cancel_order(orders.place_order("bob", {"PEN-BLUE": 10}))
    assert orders.revenue_by_customer() == {"ada": 300, "bob": 450}


def test_concurrent_orders_from_threads_share_the_test_sandbox(shop) -> None:
    # A thread does not inherit the test's sandbox; allow() lets it in. The sandbox's
    # connection is taken in turns, so the orders are serialised as row locks would.
    def buy() -> None:
        orders.place_order("thread", {"PEN-BLUE": 5})

    threads = [threading.Thread(target=buy) for _ in range(4)]
    for thread in threads:
        db.pool.allow(thread)
        thread.start()
    for thread in threads:
        thread.join()
    assert catalog.get_product("PEN-BLUE").on_hand == 20
    assert orders.revenue_by_customer() == {"thread": 4 * 5 * 150}
