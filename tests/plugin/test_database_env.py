"""corral_database_env end to end: every shape an app reads its database location in.

On corral's throwaway server (TCP on 127.0.0.1 with a password) the URL has a host and a
port, so strict parsers (pydantic's ``PostgresDsn``, SQLAlchemy's ``make_url``) take it;
apps that build their URL from parts get the parts; libpq's variables reach the same
database. The environment is put back when the process's database goes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from corral._plugin._database import WorkerDatabase
from corral._plugin._dbenv import LIBPQ_VARIABLES
from corral._plugin._run import RunInfo
from corral._plugin._settings import empty_schema
from corral.broker import Broker, Client
from corral.postgres import drop_database, ensure_template

ENTRIES = (
    "DATABASE_URL",
    "POSTGRES_SERVER={host}",
    "POSTGRES_PORT={port}",
    "POSTGRES_USER={user}",
    "POSTGRES_PASSWORD={password}",
    "POSTGRES_DB={dbname}",
    "SQLALCHEMY_DATABASE_URI={sqlalchemy_url}",
    "ASYNC_DATABASE_URL={asyncpg_url}",
    "DB_URL_BUILT=postgresql://{user}:{password}@{host}:{port}/{dbname}",
)

SHAPES_TEST = """
import asyncio
import os

import asyncpg
import psycopg
import pytest
from pydantic import PostgresDsn, TypeAdapter
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

URL = os.environ["CORRAL_DATABASE_URL"]


class Settings(BaseSettings):
    # The FastAPI full-stack template's shape: parts in, a PostgresDsn built from them.
    POSTGRES_SERVER: str
    POSTGRES_PORT: int
    POSTGRES_USER: str
    POSTGRES_PASSWORD: str
    POSTGRES_DB: str

    @property
    def uri(self) -> str:
        return str(PostgresDsn.build(
            scheme="postgresql+psycopg", username=self.POSTGRES_USER,
            password=self.POSTGRES_PASSWORD, host=self.POSTGRES_SERVER,
            port=self.POSTGRES_PORT, path=self.POSTGRES_DB,
        ))


class UrlSettings(BaseSettings):
    DATABASE_URL: PostgresDsn


def database_of(dsn):
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT current_database(), inet_server_addr() IS NOT NULL").fetchone()


def test_the_url_has_a_host_and_a_port_on_the_loopback():
    dsn = TypeAdapter(PostgresDsn).validate_python(URL)
    (host,) = dsn.hosts()
    assert (host["host"], host["username"]) == ("127.0.0.1", "postgres")
    assert host["port"] and host["password"]
    assert str(UrlSettings().DATABASE_URL) == URL == os.environ["DATABASE_URL"]
    url = make_url(os.environ["SQLALCHEMY_DATABASE_URI"])
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "127.0.0.1", host["port"])
    assert make_url(os.environ["ASYNC_DATABASE_URL"]).drivername == "postgresql+asyncpg"
    name, tcp = database_of(URL)
    assert name == os.environ["POSTGRES_DB"] and tcp


def test_parts_build_a_url_to_the_same_database():
    settings = Settings()
    assert settings.POSTGRES_SERVER == "127.0.0.1"
    built = settings.uri.replace("+psycopg", "")
    name = database_of(URL)[0]
    assert database_of(built)[0] == database_of(os.environ["DB_URL_BUILT"])[0] == name


def test_libpq_defaults_reach_the_same_database():
    assert os.environ["PGHOST"] == "127.0.0.1"
    assert os.environ["PGDATABASE"] == os.environ["POSTGRES_DB"]
    assert database_of("") == database_of(URL)


def test_asyncpg_connects_over_tcp_too():
    async def name():
        conn = await asyncpg.connect(URL)
        try:
            return await conn.fetchval("SELECT current_database()")
        finally:
            await conn.close()

    assert asyncio.run(name()) == os.environ["POSTGRES_DB"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_every_shape_on_the_throwaway_server(inner: pytest.Pytester, workers: str) -> None:
    pytest.importorskip("pydantic_settings")
    entries = " ".join(f'"{e}"' for e in ENTRIES)
    (inner.path / "pytest.ini").write_text(
        "[pytest]\n"
        "corral_schema = schema.sql\n"
        f"corral_database_env = {entries}\n"
        "asyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    (inner.path / "conftest.py").unlink()  # the sample's conftest imports its app
    inner.makepyfile(test_shapes=SHAPES_TEST)
    result = inner.runpytest_subprocess("-n", workers, "-p", "no:randomly", "test_shapes.py")
    result.assert_outcomes(passed=4)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        (
            "POSTGRES_SERVER={hostname}",
            "ERROR: corral_database_env: 'POSTGRES_SERVER={hostname}': unknown part {hostname}; "
            "the parts are {url}, {host}, {port}, {user}, {password}, {dbname}, "
            "{sqlalchemy_url}, {asyncpg_url}",
        ),
        (
            "1DB",
            "ERROR: corral_database_env: '1DB' is not an environment variable name "
            "(entry '1DB'); write NAME or NAME={part}",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_parts(
    inner: pytest.Pytester, entry: str, says: str
) -> None:
    (inner.path / "pytest.ini").write_text(
        f"[pytest]\ncorral_schema = schema.sql\ncorral_database_env = {entry}\n"
    )
    result = inner.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.errlines if line.strip()] == [says]
    assert "Traceback" not in result.stdout.str()


@pytest.fixture
def broker() -> Iterator[str]:
    server = Broker(require_ttl=False)
    path = server.start()
    try:
        yield path
    finally:
        server.stop()


def test_the_environment_is_put_back_when_the_database_goes(
    postgres_dsn: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGHOST", "before")
    monkeypatch.setenv("POSTGRES_DB", "the developer's")
    for name in ("DATABASE_URL", "CORRAL_DATABASE_URL", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    template = ensure_template(postgres_dsn, empty_schema)
    info = RunInfo(
        run_id="envtest",
        controller_pid=os.getpid(),
        broker_path=broker,
        admin_dsn=postgres_dsn,
        template=template,
        database_env=("DATABASE_URL", "POSTGRES_DB={dbname}", "PORT_TOO=:{port}"),
    )
    with Client(broker) as client:
        database = WorkerDatabase(info, client, f"w@{os.getpid()}")
        url = database.acquire()
        try:
            assert os.environ["CORRAL_DATABASE_URL"] == os.environ["DATABASE_URL"] == url
            assert os.environ["POSTGRES_DB"] == os.environ["PGDATABASE"] == database.name
            assert os.environ["PORT_TOO"] == ":" + os.environ["PGPORT"]
            assert set(LIBPQ_VARIABLES) <= set(os.environ)
            assert os.environ["PGHOST"] != "before"
        finally:
            database.release()
            drop_database(postgres_dsn, database.name)
    assert dict(os.environ) == before
