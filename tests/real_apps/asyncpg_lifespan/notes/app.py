"""Notes over HTTP; the asyncpg pool lives as long as the app (lifespan)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from corral.sandbox import sandbox


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # corral's one line: inert in production (CORRAL_SANDBOX_MODE is unset there).
    app.state.pool = sandbox(await asyncpg.create_pool(os.environ["DATABASE_URL"]))
    try:
        yield
    finally:
        await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


class NoteIn(BaseModel):
    title: str
    body: str = ""


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, request: Request) -> dict[str, int]:
    try:
        note_id = await request.app.state.pool.fetchval(
            "INSERT INTO notes (title, body) VALUES ($1, $2) RETURNING id", note.title, note.body
        )
    except asyncpg.UniqueViolationError:
        raise HTTPException(409, "title taken") from None
    return {"id": note_id}


@app.get("/notes")
async def list_notes(request: Request) -> dict[str, object]:
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch("SELECT id, title FROM notes ORDER BY id")
        total = await conn.fetchval("SELECT count(*) FROM notes")
    return {"notes": [dict(r) for r in rows], "total": total}
