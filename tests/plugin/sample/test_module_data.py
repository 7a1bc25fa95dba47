from __future__ import annotations

from collections.abc import Iterator

import app  # type: ignore[import-not-found]
import pytest


@pytest.fixture(scope="module")
def module_data() -> Iterator[None]:
    # Data for every test of this module, made once: each test nests inside it.
    with app.pool.sandboxed():
        app.add_item("module-row")
        yield


@pytest.mark.parametrize("n", range(3))
def test_module_data_is_seen_and_own_changes_roll_back(module_data: None, n: int) -> None:
    app.add_item("widget")
    assert app.names() == ["seed", "module-row", "widget"]
