"""A sandboxed handle connected to another database than its process's gets one warning.

The app read its URL before corral set it, or from a variable corral does not set: its
tests then run against the wrong database, and before this nothing said so.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest

from corral.postgres import database_dsn, drop_database
from tests._inner import RUN_VARIABLES

_CONFTEST = """
import os

import sqlalchemy
from psycopg_pool import ConnectionPool
from sqlalchemy.ext.asyncio import create_async_engine

from corral._plugin._dbenv import url_parts
from corral.sandbox import sandbox

OTHER = url_parts(os.environ["APP_DATABASE_URL"])

# Right: the URL corral exported.
own = sandbox(ConnectionPool(os.environ["DATABASE_URL"], min_size=1, open=True, name="own"))
# Wrong: the app's own variable, which names the developer's database.
engine = sqlalchemy.create_engine(OTHER["sqlalchemy_url"])
async_engine = create_async_engine(OTHER["asyncpg_url"], poolclass=sqlalchemy.NullPool)
boxes = [sandbox(engine), sandbox(async_engine)]  # SQLAlchemy engines stay the app's own
"""

_TESTS = """
import pytest
import sqlalchemy

from conftest import async_engine, engine, own

@pytest.mark.parametrize("n", range(3))
def test_sync(n):
    with own.connection() as conn:
        conn.execute("SELECT 1")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT 1"))

@pytest.mark.asyncio
async def test_async():
    async with async_engine.connect() as conn:
        await conn.execute(sqlalchemy.text("SELECT 1"))
"""


@pytest.fixture
def developer_database(shared_server: str) -> Iterator[tuple[str, str]]:
    name = f"corral_devdb_{secrets.token_hex(4)}"
    with psycopg.connect(shared_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name, database_dsn(shared_server, name)
    drop_database(shared_server, name)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_each_handle_on_another_database_is_named_once(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    developer_database: tuple[str, str],
    workers: str,
) -> None:
    for name in (*RUN_VARIABLES, "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    other, other_url = developer_database
    monkeypatch.setenv("APP_DATABASE_URL", other_url)
    pytester.makefile(".sql", schema="CREATE TABLE item (id int);")
    pytester.makeini(
        "[pytest]\ncorral_schema = schema.sql\ncorral_database_env = DATABASE_URL\n"
        "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_handles=_TESTS)
    result = pytester.runpytest_subprocess("-n", workers, "-p", "no:randomly", "-rw")
    out = result.stdout.str()
    warned = out.count(f"is connected to database {other!r}, not to this process's database")
    if workers == "0":
        result.assert_outcomes(passed=4, warnings=2)
        assert warned == 2  # once per wrong handle, not once per test
    else:
        result.assert_outcomes(passed=4)
        assert 2 <= warned <= 4  # once per wrong handle and process
    result.stdout.fnmatch_lines(
        [
            "*WrongDatabaseWarning: corral: the sandboxed handle <EngineSandbox of Engine(*) "
            f"mode=sandbox> is connected to database '{other}', not to this process's "
            "database 'corral_*_[0-9]'*",
        ]
    )
    result.stdout.fnmatch_lines(["*<AsyncpgEngineSandbox of Engine(*) mode=sandbox>*"])
    assert "'own'" not in out  # the handle on the right database is not named
    # A handle meant to reach another database: the warning can be filtered by name.
    quiet = pytester.runpytest_subprocess(
        "-n", workers, "-W", "ignore::corral.pytest_plugin.WrongDatabaseWarning"
    )
    quiet.assert_outcomes(passed=4)
    assert "WrongDatabaseWarning" not in quiet.stdout.str()
