"""Housekeeping that cannot run inside a transaction: VACUUM, concurrent index builds."""

from __future__ import annotations

from inventory.db import pool


def vacuum_analyze() -> None:
    """Reclaim space and refresh the planner's statistics of the busy tables."""
    with pool.connection() as conn:
        conn.autocommit = True
        conn.execute("VACUUM (ANALYZE) stock, stock_movement")


def ensure_movement_index() -> None:
    """Index movements by time without blocking writers (``CONCURRENTLY``)."""
    with pool.connection() as conn:
        conn.autocommit = True
        conn.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS stock_movement_at ON stock_movement (at)"
        )
