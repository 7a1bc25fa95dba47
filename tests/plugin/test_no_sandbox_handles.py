"""After a ``no_sandbox`` test the database is recreated: every kind of handle drops its
idle connections to the old one (``discard_idle()``) and works in the next tests."""

from __future__ import annotations

import pytest

# Every kind of handle, each on pools of *size* connections (one anyio runner for the
# module: the async handles live on its loop).
HANDLES = """
import asyncio
import os

import asyncpg
import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
SA_URL = sqlalchemy.engine.make_url(URL).set(drivername="postgresql+psycopg")

engine = sqlalchemy.create_engine(SA_URL, pool_size={size}, max_overflow=0, pool_timeout=5)
engine_box = sandbox(engine)
connect = sandbox(URL)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def handles(anyio_backend):
    pool = sandbox(await asyncpg.create_pool(URL, min_size={size}, max_size={size}))
    aengine = create_async_engine(SA_URL, pool_size={size}, max_overflow=0, pool_timeout=5)
    aengine_box = sandbox(aengine)
    yield pool, aengine
    await pool.close()
    await aengine_box.close()
    await aengine.dispose()
"""

# Back-to-back no_sandbox tests are the hard case: the first leaves real (normal-mode)
# connections idle in the handles, the recreation kills their backends, and the second
# checks them out again.
SUITE = (
    HANDLES.format(size=2)
    + """

async def use_all(handles, name=None):
    pool, aengine = handles
    counts = []
    if name is not None:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO item (name) VALUES (%s)", (name,))
    with engine.connect() as conn:
        counts.append(conn.exec_driver_sql("SELECT count(*) FROM item").scalar())
    with connect.connect() as conn:
        counts.append(conn.execute("SELECT count(*) FROM item").fetchone()[0])
    counts.append(await pool.fetchval("SELECT count(*) FROM item"))
    async with aengine.connect() as conn:
        result = await conn.exec_driver_sql("SELECT count(*) FROM item")
        counts.append(result.scalar())
    return counts


def committed():
    with psycopg.connect(URL) as other:
        return other.execute("SELECT count(*) FROM item").fetchone()[0]


@pytest.mark.parametrize("n", range(2))
@pytest.mark.no_sandbox
async def test_commits_for_real(handles, n):
    assert await use_all(handles, "real") == [2, 2, 2, 2]  # a fresh database each time
    assert committed() == 2


async def test_sandboxed_after(handles):
    # The engine and the conninfo handle (psycopg both, one database) share a sandbox and
    # see the row the engine wrote; the async handles (other drivers) have their own.
    assert await use_all(handles, "boxed") == [2, 2, 1, 1]
    assert committed() == 1


@pytest.mark.no_sandbox
async def test_and_once_more_for_real(handles):
    assert await use_all(handles) == [1, 1, 1, 1]
"""
)


@pytest.mark.slow
def test_every_handle_works_after_no_sandbox_tests(
    inner: pytest.Pytester, shared_server: str
) -> None:
    inner.makepyfile(test_handles=SUITE)
    result = inner.runpytest_subprocess("-n", "0", "-p", "no:randomly", "test_handles.py")
    result.assert_outcomes(passed=4)


# A pool exactly as large as the sandboxed tests need: whatever a handle keeps between
# sandboxes must be back in the app's pool when a no_sandbox test needs all of it.
FULL_POOL = (
    HANDLES.format(size=1)
    + """

async def use_all(handles, acquire_first=False):
    pool, aengine = handles
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    async with asyncio.timeout(10):  # a pool whose only connection is kept waits forever
        if acquire_first:
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT 2") == 2
            conn = await pool.acquire()
            assert await conn.fetchval("SELECT 3") == 3
            await pool.release(conn)
        assert await pool.fetchval("SELECT 1") == 1
        async with aengine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT 1")).scalar() == 1


# In file order: each no_sandbox test comes after a sandboxed one that kept the pool's
# only connection; the first takes it back through a query, the second through acquire().
async def test_sandboxed(handles):
    await use_all(handles)


@pytest.mark.no_sandbox
async def test_the_whole_pool_for_real(handles):
    await use_all(handles)


async def test_sandboxed_in_between(handles):
    await use_all(handles, acquire_first=True)


@pytest.mark.no_sandbox
async def test_the_whole_pool_for_real_by_acquire(handles):
    await use_all(handles, acquire_first=True)


async def test_sandboxed_again(handles):
    await use_all(handles)
"""
)


@pytest.mark.slow
def test_a_no_sandbox_test_gets_the_whole_pool(inner: pytest.Pytester, shared_server: str) -> None:
    inner.makepyfile(test_full=FULL_POOL)
    result = inner.runpytest_subprocess("-n", "0", "-p", "no:randomly", "test_full.py")
    result.assert_outcomes(passed=5)
