"""Alembic's environment: the URL comes from the app's settings, as in most apps."""

from __future__ import annotations

from alembic import context
from app.core.config import settings
from sqlalchemy import create_engine, pool

target_metadata = None


def run_migrations_online() -> None:
    engine = create_engine(str(settings.SQLALCHEMY_DATABASE_URI), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
