"""Which event loop an async pool runs on, learnt through public APIs only (issue 18, 7).

A psycopg_pool pool opened by a session-loop fixture cannot serve a test on a loop of its
own; the plugin gives such a test no sandbox on it instead of a checkout that waits
forever (the end-to-end run: tests/plugin/sample/test_async_pool.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.sandbox import sandbox

psycopg_pool = pytest.importorskip("psycopg_pool")

from corral._plugin._sandbox import _on_another_loop  # noqa: E402


async def _elsewhere(handle: Any) -> bool:
    return _on_another_loop(handle)


@pytest.mark.parametrize(
    ("kind", "min_size"), [("AsyncConnectionPool", 1), ("AsyncNullConnectionPool", 0)]
)
def test_a_pool_runs_on_the_loop_that_opened_it(
    postgres_dsn: str, kind: str, min_size: int
) -> None:
    own, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    # Names that share a prefix: only the pool's own scheduler counts.
    pool = getattr(psycopg_pool, kind)(
        postgres_dsn, min_size=min_size, max_size=1, open=False, name="db"
    )
    neighbour = psycopg_pool.AsyncConnectionPool(
        postgres_dsn, min_size=1, max_size=1, open=False, name="d"
    )
    handle = sandbox(pool, mode="normal")
    try:
        assert own.run_until_complete(_elsewhere(handle)) is False  # not open: runs nowhere
        own.run_until_complete(pool.open(wait=True))
        other.run_until_complete(neighbour.open(wait=True))
        assert own.run_until_complete(_elsewhere(handle)) is False
        assert other.run_until_complete(_elsewhere(handle)) is True
        own.run_until_complete(pool.close())
        assert other.run_until_complete(_elsewhere(handle)) is False  # closed: no loop
    finally:
        own.run_until_complete(pool.close())
        other.run_until_complete(neighbour.close())
        own.close()
        other.close()
