"""The corral pytest plugin (entry point ``pytest11``): options, markers, fixtures, xdist glue."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("corral", "corral: run-scoped broker and database sandboxes")
