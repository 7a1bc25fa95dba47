"""Orders: placing one reserves stock atomically; cancelling gives it back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from inventory.catalog import UnknownProduct, _move
from inventory.db import pool


class OutOfStock(RuntimeError):
    """An order asked for more than is on hand; nothing of the order was written."""

    def __init__(self, sku: str, wanted: int, on_hand: int) -> None:
        super().__init__(f"{sku}: {wanted} wanted, {on_hand} on hand")
        self.sku = sku
        self.wanted = wanted
        self.on_hand = on_hand


class InvalidTransition(RuntimeError):
    """The order's status does not allow this change (e.g. cancelling a shipped order)."""


def place_order(customer: str, lines: Mapping[str, int]) -> int:
    """Create an order for ``{sku: quantity}`` and take the items out of stock; its id.

    All or nothing: the stock rows are locked in SKU order (so two concurrent orders
    cannot deadlock) and checked before anything is written.

    :raises OutOfStock: a line wants more than is on hand.
    :raises UnknownProduct: a SKU does not exist.
    :raises ValueError: the order is empty or a quantity is not positive.
    """
    if not lines or any(quantity <= 0 for quantity in lines.values()):
        raise ValueError("an order needs at least one line, each with a positive quantity")
    with pool.connection() as conn, conn.transaction():
        order = conn.execute(
            "INSERT INTO customer_order (customer) VALUES (%s) RETURNING id", [customer]
        ).fetchone()
        assert order is not None
        for sku in sorted(lines):
            row = conn.execute(
                "SELECT p.id, p.price_cents, s.on_hand FROM product p"
                " JOIN stock s ON s.product_id = p.id WHERE p.sku = %s FOR UPDATE OF s",
                [sku],
            ).fetchone()
            if row is None:
                raise UnknownProduct(sku)
            product_id, price, on_hand = row
            if on_hand < lines[sku]:
                raise OutOfStock(sku, lines[sku], on_hand)
            conn.execute(
                "INSERT INTO order_line (order_id, product_id, quantity, price_cents)"
                " VALUES (%s, %s, %s, %s)",
                [order[0], product_id, lines[sku], price],
            )
            _move(conn, product_id, -lines[sku], f"order {order[0]}")
        return int(order[0])


def cancel_order(order_id: int) -> None:
    """Cancel a placed order and put its items back in stock.

    :raises InvalidTransition: the order is not in status ``placed``.
    :raises LookupError: no such order.
    """
    with pool.connection() as conn, conn.transaction():
        _transition(conn, order_id, "placed", "cancelled")
        lines = conn.execute(
            "SELECT product_id, quantity FROM order_line WHERE order_id = %s", [order_id]
        ).fetchall()
        for product_id, quantity in lines:
            _move(conn, product_id, quantity, f"order {order_id} cancelled")


def ship_order(order_id: int) -> None:
    """:raises InvalidTransition: the order is not in status ``placed``."""
    with pool.connection() as conn, conn.transaction():
        _transition(conn, order_id, "placed", "shipped")


def order_status(order_id: int) -> str:
    with pool.connection() as conn:
        row = conn.execute("SELECT status FROM customer_order WHERE id = %s", [order_id]).fetchone()
    if row is None:
        raise LookupError(f"no order {order_id}")
    return str(row[0])


def order_total(order_id: int) -> int:
    """The order's total in cents, at the prices of when it was placed."""
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT coalesce(sum(quantity * price_cents), 0) FROM order_line WHERE order_id = %s",
            [order_id],
        ).fetchone()
    assert row is not None
    return int(row[0])


def revenue_by_customer() -> dict[str, int]:
    """Cents per customer over orders that were not cancelled."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT o.customer, sum(l.quantity * l.price_cents) FROM customer_order o"
            " JOIN order_line l ON l.order_id = o.id WHERE o.status <> 'cancelled'"
            " GROUP BY o.customer ORDER BY o.customer"
        )
        return {customer: int(total) for customer, total in rows}


def _transition(conn: psycopg.Connection[Any], order_id: int, old: str, new: str) -> None:
    row = conn.execute(
        "SELECT status FROM customer_order WHERE id = %s FOR UPDATE", [order_id]
    ).fetchone()
    if row is None:
        raise LookupError(f"no order {order_id}")
    if row[0] != old:
        raise InvalidTransition(f"order {order_id} is {row[0]}, not {old}")
    conn.execute("UPDATE customer_order SET status = %s WHERE id = %s", [new, order_id])
