"""anyio tests: async fixtures write inside the test's sandbox (an inner run, end to end)."""

from __future__ import annotations

import pytest

# An app on an AsyncConnectionPool, opened by a module-scoped async fixture (its lifespan),
# so one anyio test runner (one loop, one task) serves the whole module.
ANYIO_SUITE = """
import os

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
pool = sandbox(AsyncConnectionPool(URL, min_size=1, max_size=2, open=False))

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def opened(anyio_backend):
    await pool.open()
    yield
    await pool.close()


async def names():
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT name FROM item ORDER BY id")
        return [r[0] for r in await cur.fetchall()]


def committed():
    with psycopg.connect(URL) as other:
        return [r[0] for r in other.execute("SELECT name FROM item ORDER BY id")]


@pytest.fixture
async def gadget(opened):
    # An async fixture writing through the async pool: inside the test's sandbox.
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('gadget')")
    yield "gadget"
    assert await names() == ["seed", "gadget", "widget"]  # teardown: still inside


@pytest.mark.parametrize("n", range(2))
async def test_fixture_row_is_in_the_sandbox(gadget, n):
    # The same unique name every time: a row left behind would fail the second one.
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('widget')")
    assert await names() == ["seed", "gadget", "widget"]
    assert committed() == ["seed"]


async def test_sync_handle_in_the_same_test(opened):
    # The sample app's sync pool: its sandbox opened after this module's runner task
    # started (a task's context is a copy made at its start), yet the test sees it.
    import app

    app.add_item("sync")
    assert app.names() == ["seed", "sync"]
    assert committed() == ["seed"]


async def test_the_next_test_does_not_see_it(opened):
    assert await names() == ["seed"]
    assert committed() == ["seed"]


async def test_a_fixture_free_test_still_gets_a_sandbox(opened):
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES ('gadget')")
    assert await names() == ["seed", "gadget"]
    assert committed() == ["seed"]
"""


@pytest.mark.slow
def test_anyio_async_fixture_writes_inside_the_sandbox(
    inner: pytest.Pytester, shared_server: str
) -> None:
    inner.makepyfile(test_anyio_fixture=ANYIO_SUITE)
    result = inner.runpytest_subprocess("-n", "0", "-p", "no:randomly", "test_anyio_fixture.py")
    result.assert_outcomes(passed=5)
