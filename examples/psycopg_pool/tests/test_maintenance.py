"""Statements PostgreSQL refuses inside a transaction: they need a test outside the sandbox."""

from __future__ import annotations

import psycopg
import pytest
from inventory import catalog, db, maintenance

from corral.errors import UnsupportedStatement


def test_vacuum_inside_a_sandbox_says_what_to_do() -> None:
    with pytest.raises(UnsupportedStatement, match="no_sandbox"):
        maintenance.vacuum_analyze()


@pytest.mark.no_sandbox
def test_vacuum_and_concurrent_index_for_real() -> None:
    # No sandbox: this test commits. corral recreates this process's database afterwards,
    # so nothing here reaches another test.
    catalog.add_product("COMMITTED-1", "committed for real", 100, on_hand=1)
    maintenance.vacuum_analyze()
    maintenance.ensure_movement_index()
    with psycopg.connect(db.DATABASE_URL) as other:
        assert other.execute("SELECT count(*) FROM product").fetchone() == (3,)
        assert other.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'stock_movement_at'"
        ).fetchone() == (1,)


def test_what_a_no_sandbox_test_committed_is_gone() -> None:
    with pytest.raises(catalog.UnknownProduct):
        catalog.get_product("COMMITTED-1")
