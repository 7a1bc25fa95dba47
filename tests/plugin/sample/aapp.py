"""The async flavour: a sandboxed async connection factory."""

from __future__ import annotations

import os

import psycopg

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]


async def _connect() -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(URL)


db = sandbox(_connect)


async def add_item(name: str) -> None:
    async with await db.connect() as conn:
        await conn.execute("INSERT INTO item (name) VALUES (%s)", [name])
        await conn.commit()


async def names() -> list[str]:
    async with await db.connect() as conn:
        cur = await conn.execute("SELECT name FROM item ORDER BY id")
        return [r[0] for r in await cur.fetchall()]
