"""Which controller sandboxes a SQLAlchemy engine: one per driver (:mod:`._sqlalchemy_psycopg`,
:mod:`._sqlalchemy_asyncpg`), built on :mod:`._sqlalchemy`. Each driver's module imports
that driver, so only the engine's own is imported.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["sandbox_engine"]


def sandbox_engine(handle: Any, *, mode: str | None = None, **options: Any) -> Any:
    """The controller for an ``Engine`` / ``AsyncEngine``, sandboxed in place.

    :raises TypeError: another SQLAlchemy object (a session, a sessionmaker...), or an
        engine whose dialect corral does not support.
    """
    if isinstance(handle, AsyncEngine):
        engine = handle.sync_engine
    elif isinstance(handle, Engine):
        engine = handle
    else:
        bind = getattr(handle, "bind", None) or getattr(handle, "kw", {}).get("bind")
        hint = f" (here: sandbox({bind!r}))" if bind is not None else ""
        raise TypeError(
            f"corral sandboxes SQLAlchemy engines, not a {type(handle).__qualname__}: "
            f"call sandbox(engine) on the engine your sessions are bound to{hint}; "
            "sessions and sessionmakers bound to it then need no change"
        )
    dialect = engine.dialect
    name = f"{dialect.name}+{dialect.driver}"
    # Each driver's module imports that driver: only the engine's own is needed.
    if dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg_async"):
        from corral.sandbox import _sqlalchemy_psycopg

        if dialect.is_async:
            return _sqlalchemy_psycopg.PsycopgAsyncEngineSandbox(handle, mode=mode, **options)
        return _sqlalchemy_psycopg.EngineSandbox(handle, mode=mode, **options)
    if dialect.name == "postgresql" and dialect.driver == "asyncpg":
        from corral.sandbox._sqlalchemy_asyncpg import AsyncpgEngineSandbox

        return AsyncpgEngineSandbox(handle, mode=mode, **options)
    raise TypeError(
        f"corral cannot sandbox a {name} engine: it supports postgresql+psycopg (sync and "
        "async) and postgresql+asyncpg. Switch the test URL's driver, e.g. "
        "postgresql+psycopg://..."
    )
