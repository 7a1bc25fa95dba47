"""corral_database_env end to end: every shape an app reads its database location in.

On corral's throwaway server (TCP on 127.0.0.1 with a password) the URL has a host and a
port, so strict parsers (pydantic's ``PostgresDsn``, SQLAlchemy's ``make_url``,
dj-database-url) take it, and the socket directory in its query, which libpq and
SQLAlchemy use (asyncpg and Django keep the host: TCP); apps that build their URL from
parts get the parts (TCP); libpq's variables reach the same database (the socket).
The environment is put back when the process's database goes.
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
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

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


WHERE = "SELECT current_database(), coalesce(host(inet_server_addr()), 'socket')"


def database_of(dsn):
    with psycopg.connect(dsn) as conn:
        return tuple(conn.execute(WHERE).fetchone())


def test_the_url_has_a_host_and_a_port_on_the_loopback():
    dsn = TypeAdapter(PostgresDsn).validate_python(URL)
    (host,) = dsn.hosts()
    assert (host["host"], host["username"]) == ("127.0.0.1", "postgres")
    assert host["port"] and host["password"]
    assert str(UrlSettings().DATABASE_URL) == URL == os.environ["DATABASE_URL"]
    url = make_url(os.environ["SQLALCHEMY_DATABASE_URI"])
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "127.0.0.1", host["port"])
    assert make_url(os.environ["ASYNC_DATABASE_URL"]).drivername == "postgresql+asyncpg"
    # libpq takes the socket directory of the query over the URL's host: the faster way.
    assert database_of(URL) == (os.environ["POSTGRES_DB"], "socket")


def test_sqlalchemy_engines_use_the_socket():
    engine = create_engine(os.environ["SQLALCHEMY_DATABASE_URI"], poolclass=NullPool)
    with engine.connect() as conn:
        assert tuple(conn.exec_driver_sql(WHERE).one()) == database_of(URL)

    async def where():
        engine = create_async_engine(os.environ["ASYNC_DATABASE_URL"], poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return tuple((await conn.exec_driver_sql(WHERE)).one())
        finally:
            await engine.dispose()

    assert asyncio.run(where()) == database_of(URL)


def test_parts_build_a_url_to_the_same_database():
    settings = Settings()
    assert settings.POSTGRES_SERVER == "127.0.0.1"
    built = settings.uri.replace("+psycopg", "")
    name = database_of(URL)[0]
    # A URL built from parts has no socket directory: TCP, with the password.
    assert database_of(built) == database_of(os.environ["DB_URL_BUILT"]) == (name, "127.0.0.1")


def test_libpq_defaults_reach_the_same_database():
    assert os.environ["PGHOST"].startswith("/")  # the socket directory: libpq takes one
    assert os.environ["PGDATABASE"] == os.environ["POSTGRES_DB"]
    assert database_of("") == database_of(URL)


def test_asyncpg_keeps_the_urls_host_and_connects_over_tcp():
    async def where(*args):
        conn = await asyncpg.connect(*args)
        try:
            return tuple(await conn.fetchrow(WHERE))
        finally:
            await conn.close()

    name = os.environ["POSTGRES_DB"]
    assert asyncio.run(where(URL)) == (name, "127.0.0.1")
    assert asyncio.run(where()) == (name, "socket")  # PGHOST & co.


def test_dj_database_url_and_django_connect():
    dj_database_url = pytest.importorskip("dj_database_url")
    django = pytest.importorskip("django")
    from django.conf import settings

    config = dj_database_url.parse(URL)
    assert (config["HOST"], config["NAME"]) == ("127.0.0.1", os.environ["POSTGRES_DB"])
    settings.configure(DATABASES={"default": config})
    django.setup()
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute(WHERE)
            # Django's HOST wins over OPTIONS' host: TCP, with the password.
            assert tuple(cursor.fetchone()) == (os.environ["POSTGRES_DB"], "127.0.0.1")
    finally:
        connection.close()
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
    result.assert_outcomes(passed=6)


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
