"""Use case 4: expensive set-up done once for the whole run, its result shared.

Building the price table takes a second of CPU. With five workers, ``once`` makes one
of them build it while the others wait; everyone reads the same table. (Set-up that is
database state belongs in ``corral_schema`` instead: built once per schema change.)
"""

from __future__ import annotations

import hashlib

import pytest

SKUS = [f"SKU-{i:04d}" for i in range(400)]


def build_price_table() -> dict[str, int]:
    """Derive a price for every SKU (deliberately slow: key stretching per SKU)."""
    table = {}
    for sku in SKUS:
        digest = hashlib.pbkdf2_hmac("sha256", sku.encode(), b"prices", 2000)
        table[sku] = 100 + int.from_bytes(digest[:2], "big") % 9900
    return table


@pytest.fixture(scope="session")
def price_table(corral) -> dict[str, int]:
    def build() -> dict[str, int]:
        corral.incr("price-table-builds", ttl=3600)
        return build_price_table()

    return corral.once("price-table", build, ttl=3600, timeout=120)


@pytest.mark.parametrize("sku", ["SKU-0000", "SKU-0007", "SKU-0123", "SKU-0399"])
def test_prices_come_from_the_one_table(corral, price_table: dict[str, int], sku: str) -> None:
    assert len(price_table) == len(SKUS)
    assert 100 <= price_table[sku] < 10_000
    assert corral.get("price-table-builds") == 1
