"""A small application module: reads its database URL at import, like many real apps."""

from __future__ import annotations

import os

from psycopg_pool import ConnectionPool

from corral.sandbox import sandbox

DATABASE_URL = os.environ["DATABASE_URL"]

# The one line of adoption: wrap the pool; the test run switches it to sandbox mode.
pool = sandbox(ConnectionPool(DATABASE_URL, min_size=1, max_size=4, open=True))


def add_item(name: str) -> int:
    with pool.connection() as conn:
        row = conn.execute("INSERT INTO item (name) VALUES (%s) RETURNING id", [name]).fetchone()
        assert row is not None
        return int(row[0])


def rename(old: str, new: str) -> None:
    with pool.connection() as conn, conn.transaction():
        conn.execute("UPDATE item SET name = %s WHERE name = %s", [new, old])


def names() -> list[str]:
    with pool.connection() as conn:
        return [r[0] for r in conn.execute("SELECT name FROM item ORDER BY id").fetchall()]
