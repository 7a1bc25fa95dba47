"""An async app on an AsyncConnectionPool, opened by the test session's event loop."""

from __future__ import annotations

import os

from psycopg_pool import AsyncConnectionPool

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
pool = sandbox(AsyncConnectionPool(URL, min_size=2, max_size=3, open=False))


async def add_item(name: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("INSERT INTO item (name) VALUES (%s)", [name])


async def names() -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT name FROM item ORDER BY id")
        return [r[0] for r in await cur.fetchall()]
