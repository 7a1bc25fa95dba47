"""Sandbox fixtures: a database per test module, and ``ad``: each sandbox adapter in turn.

The behaviour spec in ``tests/sandbox/`` is written against ``ad`` (see
``tests/sandbox/_adapters.py``), so every adapter must pass the same tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from psycopg import conninfo

from tests.sandbox._adapters import ADAPTERS, Adapter, connect_outside

SCHEMA = """
CREATE TABLE item (id serial PRIMARY KEY, name text NOT NULL UNIQUE, note text);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (
    id int PRIMARY KEY,
    parent_id int NOT NULL REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED
);
"""


@pytest.fixture(scope="module")
def sandbox_dsn(postgres_dsn: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with :data:`SCHEMA`, for one test module; dropped after it."""
    module = re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1])
    name = f"corral_sbx_{module}_{os.getpid()}"[:63]
    with connect_outside(postgres_dsn) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = conninfo.make_conninfo(postgres_dsn, dbname=name)
    with connect_outside(dsn) as conn:
        conn.execute(SCHEMA)
    try:
        yield dsn
    finally:
        with connect_outside(postgres_dsn) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture(params=sorted(ADAPTERS))
async def ad(request: pytest.FixtureRequest, sandbox_dsn: str) -> AsyncIterator[Adapter]:
    """One sandbox adapter over a small pool of the module's database (sandbox mode)."""
    adapter = ADAPTERS[request.param](sandbox_dsn)
    await adapter.open()
    try:
        yield adapter
    finally:
        while adapter.db._router.owned() is not None:
            await adapter.close()
        await adapter.aclose()


@pytest.fixture
def outside(sandbox_dsn: str) -> Iterator[object]:
    """An independent connection: it sees only what was really committed."""
    with connect_outside(sandbox_dsn) as conn:
        yield conn
