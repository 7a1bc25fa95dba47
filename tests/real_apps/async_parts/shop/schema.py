"""The schema step: create the tables where the settings point (as a deploy script does)."""

from __future__ import annotations

from sqlalchemy import create_engine

from shop.models import Base
from shop.settings import get_settings


def create_all(dsn: str | None = None) -> None:
    engine = create_engine(get_settings().url("postgresql+psycopg"))
    try:
        with engine.begin() as conn:
            Base.metadata.create_all(conn)
    finally:
        engine.dispose()
