"""A real Alembic project as apps lay it out, with an ``env.py`` that reads the app's settings.

The schema step is a function that runs ``alembic upgrade head``; the app's settings are
``lru_cache``d, as FastAPI apps write them. It passes with and without xdist; an
``env.py`` that reads a variable corral does not set migrates the developer's database
instead, and the run says so and stops.
"""

from __future__ import annotations

import secrets

import psycopg
import pytest

from corral.postgres import list_databases
from tests._inner import RUN_VARIABLES

pytest.importorskip("alembic")

_ALEMBIC_INI = """\
[alembic]
script_location = %(here)s/migrations
# No sqlalchemy.url: env.py takes it from the app's settings.
"""

_SETTINGS = """\
import functools
import os


class Settings:
    def __init__(self):
        self.database_url = os.environ["{variable}"]

    @property
    def sqlalchemy_url(self):
        return self.database_url.replace("postgresql://", "postgresql+psycopg://", 1)


@functools.lru_cache
def get_settings():
    return Settings()
"""

_DB = """\
from sqlalchemy import create_engine

from app.settings import get_settings

engine = create_engine(get_settings().sqlalchemy_url)
"""

_ENV_PY = """\
from alembic import context
from sqlalchemy import create_engine

from app.settings import get_settings

connectable = create_engine(get_settings().sqlalchemy_url)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
"""

_VERSION = """\
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table(
        "item",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
    )


def downgrade():
    op.drop_table("item")
"""

_MIGRATE = """\
from pathlib import Path

from alembic import command
from alembic.config import Config


def upgrade(dsn):
    # The URL is in the environment already (corral_database_env): env.py finds it there.
    command.upgrade(Config(str(Path(__file__).parents[1] / "alembic.ini")), "head")
"""

_CONFTEST = """\
from app.db import engine
from corral.sandbox import sandbox

sandbox(engine)
"""

_TESTS = """\
import pytest
from sqlalchemy import text

from app.db import engine


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_each_test_starts_empty(name):
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM item")).scalars().all() == [name]
"""


def _project(pytester: pytest.Pytester, variable: str) -> None:
    pytester.makeini(
        "[pytest]\ncorral_schema = tests.migrate:upgrade\ncorral_schema_watch = migrations\n"
        "corral_database_env = DATABASE_URL\nfilterwarnings = error\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )
    root = pytester.path
    (root / "alembic.ini").write_text(_ALEMBIC_INI)
    for directory in ("app", "migrations/versions", "tests"):
        (root / directory).mkdir(parents=True)
    (root / "app" / "__init__.py").write_text("")
    (root / "app" / "settings.py").write_text(_SETTINGS.format(variable=variable))
    (root / "app" / "db.py").write_text(_DB)
    (root / "migrations" / "env.py").write_text(_ENV_PY)
    (root / "migrations" / "versions" / "0001_item.py").write_text(_VERSION)
    (root / "tests" / "__init__.py").write_text("")
    # A template of its own: an unchanged schema reuses the template an earlier run built.
    (root / "tests" / "migrate.py").write_text(_MIGRATE + f"# {secrets.token_hex(8)}\n")
    (root / "tests" / "conftest.py").write_text(_CONFTEST)
    (root / "tests" / "test_items.py").write_text(_TESTS)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*RUN_VARIABLES, "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.usefixtures("clean_env", "shared_server")
def test_an_alembic_project_reading_cached_app_settings_passes(
    pytester: pytest.Pytester, workers: str
) -> None:
    _project(pytester, "DATABASE_URL")
    result = pytester.runpytest_subprocess("-n", workers)
    result.assert_outcomes(passed=4)


@pytest.mark.usefixtures("clean_env")
def test_an_env_py_on_the_apps_own_variable_is_caught(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    shared_server: str,
    developer_database: str,
) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", developer_database)
    _project(pytester, "APP_DATABASE_URL")  # a variable corral does not know about
    before = {db.name for db in list_databases(shared_server)}
    result = pytester.runpytest_subprocess("-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*corral: the schema step ran but created no table in the template (does your "
            "migration environment read the URL from somewhere else?)*",
            "*corral ran tests.migrate:upgrade with the template's URL as its argument and "
            "in CORRAL_DATABASE_URL, DATABASE_URL, PGHOST, PGPORT, PGUSER, PGDATABASE;*",
        ]
    )
    assert {db.name for db in list_databases(shared_server)} == before
    # Where the migration went: the developer's own database.
    with psycopg.connect(developer_database) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
