"""The test patterns real apps use (issue 15), each an inner run end to end.

Every suite runs serially, on two workers, and in several random orders (pytest-randomly):
a pattern that works only in one order does not work.
"""

from __future__ import annotations

import pytest

#: (-n, pytest-randomly seed or None): serially in file order, on two workers, shuffled.
RUNS = [("0", None), ("2", 1), ("0", 2), ("0", 3), ("2", 4), ("0", 5)]
RUN_IDS = [f"n{n}-" + ("ordered" if seed is None else f"seed{seed}") for n, seed in RUNS]


def run(inner: pytest.Pytester, name: str, workers: str, seed: int | None) -> pytest.RunResult:
    order = ["-p", "no:randomly"] if seed is None else ["-p", "randomly", f"--randomly-seed={seed}"]
    return inner.runpytest_subprocess("-n", workers, *order, f"{name}.py")


# ---------------------------------------------------------------------------- pattern 5

# Pattern 5: an event loop per test (anyio's default, pytest-asyncio's function loop
# scope), with async handles made once at import. Connections corral keeps between
# sandboxes belong to the loop that made them: the next test's loop never gets one.
LOOP_PER_TEST = """
import os

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import aapp
from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
on_asyncpg = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://", 1))
on_psycopg = create_async_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
sandbox(on_asyncpg)
sandbox(on_psycopg)


@pytest.fixture
def anyio_backend():
    return "asyncio"  # function scope: a new runner, so a new loop, for each test


async def write_and_count(engine, name):
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM item"))).scalar()


@pytest.mark.anyio
@pytest.mark.parametrize("n", range(6))
async def test_anyio_loop_per_test(n):
    assert await write_and_count(on_asyncpg, "a") == 2
    assert await write_and_count(on_psycopg, "p") == 2  # its own connection: not "a"
    await aapp.add_item("f")
    assert await aapp.names() == ["seed", "f"]


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(6))
async def test_asyncio_loop_per_test(n):
    assert await write_and_count(on_asyncpg, "a") == 2
    assert await write_and_count(on_psycopg, "p") == 2
    await aapp.add_item("f")
    assert await aapp.names() == ["seed", "f"]
"""


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "seed"), RUNS, ids=RUN_IDS)
def test_an_event_loop_per_test(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    inner.makepyfile(test_loop_per_test=LOOP_PER_TEST)
    result = run(inner, "test_loop_per_test", workers, seed)
    result.assert_outcomes(passed=12)
