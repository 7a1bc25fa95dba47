"""Products and stock: adding products, receiving stock, stock levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from inventory.db import pool


class DuplicateSku(ValueError):
    """A product with this SKU exists already."""


class UnknownProduct(LookupError):
    """No product has this SKU."""


@dataclass(frozen=True)
class Product:
    id: int
    sku: str
    name: str
    price_cents: int
    on_hand: int


_SELECT = """
    SELECT p.id, p.sku, p.name, p.price_cents, s.on_hand
    FROM product p JOIN stock s ON s.product_id = p.id
"""


def add_product(sku: str, name: str, price_cents: int, on_hand: int = 0) -> Product:
    """Create a product with its stock row, in one transaction.

    :raises DuplicateSku: the SKU is taken (nothing was written).
    :raises ValueError: the SKU or price breaks a constraint.
    """
    try:
        with pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "INSERT INTO product (sku, name, price_cents) VALUES (%s, %s, %s) RETURNING id",
                [sku, name, price_cents],
            ).fetchone()
            assert row is not None
            conn.execute(
                "INSERT INTO stock (product_id, on_hand) VALUES (%s, 0)",
                [row[0]],
            )
            if on_hand:
                _move(conn, row[0], on_hand, "initial stock")
    except psycopg.errors.UniqueViolation as exc:
        raise DuplicateSku(f"SKU {sku!r} exists already") from exc
    except psycopg.errors.CheckViolation as exc:
        raise ValueError(f"invalid product {sku!r}: {exc.diag.constraint_name}") from exc
    return get_product(sku)


def get_product(sku: str) -> Product:
    """:raises UnknownProduct: no product has *sku*."""
    with pool.connection() as conn:
        row = conn.execute(_SELECT + " WHERE p.sku = %s", [sku]).fetchone()
    if row is None:
        raise UnknownProduct(sku)
    return Product(*row)


def list_products() -> list[Product]:
    with pool.connection() as conn:
        return [Product(*row) for row in conn.execute(_SELECT + " ORDER BY p.sku")]


def receive(sku: str, quantity: int, reason: str = "delivery") -> int:
    """Add delivered stock; the new stock level.

    :raises ValueError: *quantity* is not positive.
    """
    if quantity <= 0:
        raise ValueError("received quantity must be positive")
    product = get_product(sku)
    with pool.connection() as conn, conn.transaction():
        return _move(conn, product.id, quantity, reason)


def low_stock(threshold: int) -> list[str]:
    """SKUs with fewer than *threshold* items on hand, alphabetically."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT p.sku FROM product p JOIN stock s ON s.product_id = p.id"
            " WHERE s.on_hand < %s ORDER BY p.sku",
            [threshold],
        )
        return [sku for (sku,) in rows]


def movements(sku: str) -> list[tuple[int, str]]:
    """``(delta, reason)`` of every stock movement of *sku*, oldest first."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT m.delta, m.reason FROM stock_movement m JOIN product p"
            " ON p.id = m.product_id WHERE p.sku = %s ORDER BY m.id",
            [sku],
        )
        return [(delta, reason) for delta, reason in rows]


def _move(conn: psycopg.Connection[Any], product_id: int, delta: int, reason: str) -> int:
    """Change the stock of *product_id* by *delta* and record why; the new level."""
    row = conn.execute(
        "UPDATE stock SET on_hand = on_hand + %s WHERE product_id = %s RETURNING on_hand",
        [delta, product_id],
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO stock_movement (product_id, delta, reason) VALUES (%s, %s, %s)",
        [product_id, delta, reason],
    )
    return int(row[0])
