"""A real PostgreSQL for the tests: ``CORRAL_TEST_DSN`` if set, else corral's throwaway one.

``postgres_dsn`` is a superuser DSN of a running server (``postgres_tcp_dsn``: the same
over TCP), one per test session (per xdist worker: each worker starts its own cluster,
~0.12 s from corral's initdb cache; the first start on a machine runs initdb once while
the other workers wait for it). Tests create their own databases on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from corral.postgres import EphemeralPostgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EphemeralPostgres | None]:
    """corral's throwaway server (also on TCP), or None when ``CORRAL_TEST_DSN`` is set."""
    if os.environ.get("CORRAL_TEST_DSN"):
        yield None
        return
    with EphemeralPostgres(tcp=True) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: EphemeralPostgres | None) -> str:
    return os.environ.get("CORRAL_TEST_DSN") or _started(postgres_server).dsn


@pytest.fixture(scope="session")
def postgres_tcp_dsn(postgres_server: EphemeralPostgres | None) -> str:
    """The same server as a URL with a host and a port (what pydantic's PostgresDsn wants)."""
    return os.environ.get("CORRAL_TEST_DSN") or _started(postgres_server).tcp_dsn


def _started(server: EphemeralPostgres | None) -> EphemeralPostgres:
    assert server is not None
    return server
