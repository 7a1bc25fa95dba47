"""Builds the schema: the ``corral_schema`` hook, and what a deployment would run.

A real project would call its migration tool here (``alembic upgrade head``); this
example creates the tables from the models.
"""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from blog.models import Base


def create_all(dsn: str) -> None:
    """Create every table in the database at *dsn* (a libpq URL)."""
    url = make_url(dsn).set(drivername="postgresql+psycopg")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
    finally:
        engine.dispose()
