"""The engine and the session dependency; under test the engine is sandboxed in place.

``sandbox(engine)`` is the whole adoption: everything bound to the engine (sessions,
``engine.begin()``) then runs in the current test's rolled-back transaction. Without
``CORRAL_SANDBOX_MODE=sandbox`` (set by corral's pytest plugin) it does nothing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from corral.sandbox import sandbox


def async_url(url: str) -> str:
    """The app's URL with SQLAlchemy's async psycopg driver (``postgresql+psycopg``)."""
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql:///blog")

engine = create_async_engine(async_url(DATABASE_URL), pool_size=5)
#: Keep a reference: corral holds sandboxed handles weakly.
engine_sandbox = sandbox(engine)

Session = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    """One session per request (a FastAPI dependency)."""
    async with Session() as session:
        yield session
