"""``alembic upgrade head``, as a deployment runs it (corral's schema step calls it)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parents[2]


def upgrade(dsn: str | None = None) -> None:
    # Like the apps this models, the migration environment reads the app's settings,
    # not the URL it is handed.
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    command.upgrade(config, "head")
