"""Global test set-up: switch the app's pool to sandbox mode, shared fixtures.

corral's pytest plugin has already, before this file is imported, given this process its
own database cloned from ``schema.sql`` and exported its URL as ``DATABASE_URL``. It opens
a sandbox on every sandboxed handle before each test and rolls it back afterwards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

# Before the app is imported: its pool is created (and wrapped) at import time.
os.environ.setdefault("INVENTORY_DB_MODE", "sandbox")

from inventory import catalog, db

_skus = itertools.count(1)


def pytest_report_header() -> str:
    return f"inventory: pool in {db.DB_MODE} mode"


@pytest.fixture
def new_product() -> Callable[..., catalog.Product]:
    """A factory of products with fresh SKUs (tests never rely on literal ids or SKUs)."""

    def make(price_cents: int = 1000, on_hand: int = 10, name: str = "Widget") -> catalog.Product:
        return catalog.add_product(f"W-{os.getpid()}-{next(_skus)}", name, price_cents, on_hand)

    return make


@pytest.fixture(scope="module")
def shop() -> Iterator[dict[str, catalog.Product]]:
    """A catalogue created once per module; every test rolls back to it (nested sandbox)."""
    with db.pool.sandboxed():
        yield {
            "pen": catalog.add_product("PEN-BLUE", "Blue pen", 150, on_hand=40),
            "pad": catalog.add_product("PAD-A5", "A5 notepad", 450, on_hand=12),
            "ink": catalog.add_product("INK-BLACK", "Black ink", 800, on_hand=0),
        }
