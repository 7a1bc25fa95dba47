"""An app with asyncpg and no psycopg: the plugin's admin work (template, clones, drops)
runs on asyncpg, and the app's suite passes with ini lines only."""

from __future__ import annotations

import os

import pytest

from corral.postgres import EphemeralPostgres, default_cache_dir
from tests._inner import RUN_VARIABLES

# Ahead of everything on sys.path in the inner run and its workers: `import psycopg` fails
# there as it does where psycopg is not installed.
HIDE_PSYCOPG = """
import importlib.abc
import sys


class NoPsycopg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("psycopg", "psycopg_pool", "psycopg_binary"):
            raise ImportError(f"No module named {name!r} (hidden: an asyncpg-only app)")
        return None


sys.meta_path.insert(0, NoPsycopg())
"""

SCHEMA = """
CREATE TABLE item (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
INSERT INTO item (name) VALUES ('seed');
"""

SUITE = """
import os

import asyncpg
import pytest

from corral.sandbox import sandbox

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def pool(anyio_backend):
    url = os.environ["CORRAL_DATABASE_URL"]
    pool = sandbox(await asyncpg.create_pool(url, min_size=1, max_size=2))
    yield pool
    await pool.close()


@pytest.mark.parametrize("n", range(3))
async def test_writes_are_rolled_back(pool, n):
    assert await pool.fetchval("SELECT count(*) FROM item") == 1
    await pool.execute("INSERT INTO item (name) VALUES ($1)", f"t{n}")
    assert await pool.fetchval("SELECT count(*) FROM item") == 2


async def test_the_sandbox_connects_through_the_socket(pool):
    # asyncpg keeps the URL's 127.0.0.1, but on corral's own server the sandbox takes the
    # Unix socket (no server address); a user's server (--corral-dsn) is left as it is.
    where = await pool.fetchval("SELECT host(inet_server_addr())")
    assert where == os.environ.get("EXPECT_SERVER_ADDR")


def test_psycopg_is_not_importable():
    with pytest.raises(ImportError, match="hidden"):
        import psycopg  # noqa: F401
"""


@pytest.fixture
def app(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORRAL_PG_CACHE_DIR", str(default_cache_dir()))
    hide = pytester.mkdir("hide_psycopg")
    (hide / "sitecustomize.py").write_text(HIDE_PSYCOPG)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]))
    (pytester.path / "schema.sql").write_text(SCHEMA)
    pytester.makeini("[pytest]\ncorral_schema = schema.sql\n")
    pytester.makepyfile(test_app=SUITE)
    return pytester


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_asyncpg_only_app_passes(app: pytest.Pytester, workers: str) -> None:
    result = app.runpytest_subprocess("-n", workers, "-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.slow
def test_a_users_server_is_not_rerouted(
    app: pytest.Pytester, postgres_server: EphemeralPostgres | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--corral-dsn: even a server that listens on a socket too is the user's to route."""
    if postgres_server is None:
        pytest.skip("needs corral's throwaway server (CORRAL_TEST_DSN is set)")
    monkeypatch.setenv("CORRAL_DSN", postgres_server.url)  # its socket is in the query
    monkeypatch.setenv("EXPECT_SERVER_ADDR", "127.0.0.1")
    result = app.runpytest_subprocess("-n", "0", "-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
