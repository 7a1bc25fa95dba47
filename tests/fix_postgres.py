"""A real PostgreSQL for the tests: ``CORRAL_TEST_DSN`` if set, else corral's throwaway one.

``postgres_dsn`` is a superuser DSN of a running server, one per test session (per xdist
worker: each worker starts its own cluster, ~0.12 s from corral's initdb cache; the first
start on a machine runs initdb once while the other workers wait for it). Tests create
their own databases on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    dsn = os.environ.get("CORRAL_TEST_DSN")
    if dsn:
        yield dsn
        return
    from corral.postgres import EphemeralPostgres

    with EphemeralPostgres() as server:
        yield server.dsn
