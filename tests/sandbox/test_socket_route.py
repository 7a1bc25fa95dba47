"""asyncpg handles on a server reachable both by TCP and by a Unix socket (the pytest plugin's
throwaway server): their sandboxes connect through the socket once the plugin says so
(``add_socket_route``), and never otherwise (a user's server).

``inet_server_addr()`` is NULL on a Unix socket connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from corral.postgres import EphemeralPostgres
from corral.sandbox import AsyncpgPoolSandbox, sandbox
from corral.sandbox._targets import (
    add_socket_route,
    asyncpg_socket,
    remove_socket_route,
    target,
)

WHERE = "SELECT host(inet_server_addr())"


@pytest.fixture
def server(postgres_server: EphemeralPostgres | None) -> EphemeralPostgres:
    if postgres_server is None:
        pytest.skip("needs corral's throwaway server (CORRAL_TEST_DSN is set)")
    return postgres_server


@pytest.fixture
def dbname(sandbox_dsn: str) -> str:
    return str(conninfo_to_dict(sandbox_dsn)["dbname"])


@pytest.fixture
def url(server: EphemeralPostgres, dbname: str) -> str:
    """The URL the plugin hands out: TCP host and port, the socket directory in the query."""
    return server.url_for(dbname)


@pytest.fixture
def routed(server: EphemeralPostgres) -> Iterator[str]:
    """What the plugin does in each test process on its throwaway server."""
    add_socket_route(server.port, server.host)
    yield server.host
    remove_socket_route(server.port)


# ---------------------------------------------------------------- where asyncpg would go


def test_asyncpg_socket_follows_asyncpgs_order_of_hosts(
    routed: str, server: EphemeralPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = server.port
    tcp = f"postgresql://postgres:pw@127.0.0.1:{port}/db"
    assert asyncpg_socket(tcp, {}) == (routed, port)
    assert asyncpg_socket(f"{tcp}?host={routed}", {}) == (routed, port)  # URL host wins
    assert asyncpg_socket(tcp.replace("127.0.0.1", "localhost"), {}) == (routed, port)
    assert asyncpg_socket(None, {"host": "127.0.0.1", "port": port}) == (routed, port)
    assert asyncpg_socket(None, {"host": "127.0.0.1", "port": str(port)}) == (routed, port)
    # Already the socket, or another server: as configured.
    assert asyncpg_socket(tcp, {"host": routed}) is None
    assert asyncpg_socket(f"postgresql://postgres@/db?host={routed}&port={port}", {}) is None
    assert asyncpg_socket(tcp.replace(f":{port}", f":{port + 1}"), {}) is None
    assert asyncpg_socket(tcp.replace("127.0.0.1", "10.1.2.3"), {}) is None
    assert asyncpg_socket(f"postgresql://u@127.0.0.1:{port},127.0.0.1:1/db", {}) is None
    assert asyncpg_socket(tcp, {"port": [port, port]}) is None
    assert asyncpg_socket(f"{tcp}?service=x", {}) is None
    # No host anywhere but the environment: asyncpg reads PGHOST and PGPORT.
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(port))
    assert asyncpg_socket("postgresql:///db", {}) == (routed, port)
    assert asyncpg_socket(None, {}) == (routed, port)


def test_nothing_is_rerouted_without_a_route(server: EphemeralPostgres) -> None:
    assert asyncpg_socket(f"postgresql://postgres:pw@127.0.0.1:{server.port}/db", {}) is None


def test_tcp_and_socket_targets_are_one_database(routed: str, server: EphemeralPostgres) -> None:
    """Handles on the same database share its sandbox, whichever way they reach it."""
    tcp = f"postgresql://postgres:pw@127.0.0.1:{server.port}/db"
    assert target(tcp) == target(f"{tcp}?host={routed}") == (routed, str(server.port), "db")
    remove_socket_route(server.port)
    assert target(tcp) == ("127.0.0.1", str(server.port), "db")


# ---------------------------------------------------------------- asyncpg pools


@pytest_asyncio.fixture
async def url_pool(url: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    yield pool
    pool.terminate()  # closed by the test; a failed one may still hold a connection


async def _sandboxed_where(db: AsyncpgPoolSandbox) -> Any:
    await db.create_sandbox()
    try:
        return await db.fetchval(WHERE)
    finally:
        await db.close_sandbox()


@pytest.mark.asyncio
async def test_a_pool_from_the_handed_out_url_sandboxes_on_the_socket(
    routed: str, url_pool: Any, outside: Any
) -> None:
    assert await url_pool.fetchval(WHERE) == "127.0.0.1"  # asyncpg keeps the URL's host
    db = sandbox(url_pool, mode="sandbox")
    assert isinstance(db, AsyncpgPoolSandbox)
    await db.create_sandbox()
    try:
        assert await db.fetchval(WHERE) is None
        async with db.acquire() as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO item (name) VALUES ('committed')")
            with pytest.raises(asyncpg.UniqueViolationError):  # noqa: PT012
                async with conn.transaction():
                    await conn.execute("INSERT INTO item (name) VALUES ('rolled back')")
                    await conn.execute("INSERT INTO item (name) VALUES ('committed')")
            names = await conn.fetchval("SELECT array_agg(name ORDER BY name) FROM item")
            assert names == ["committed"]
        assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0
    finally:
        await db.close_sandbox()
    assert outside.execute("SELECT count(*) FROM item").fetchone()[0] == 0
    # Normal mode goes through the pool, which connects the same way from now on.
    db.mode = "normal"
    assert await db.fetchval(WHERE) is None
    await db.close()


@pytest.mark.asyncio
async def test_a_pool_from_parts_keeps_its_settings_and_init(
    routed: str, server: EphemeralPostgres, dbname: str
) -> None:
    inits: list[Any] = []

    async def init(conn: Any) -> None:
        inits.append(await conn.fetchval(WHERE))

    pool = await asyncpg.create_pool(
        host="localhost",
        port=server.port,
        user="postgres",
        password=server.password,
        database=dbname,
        server_settings={"application_name": "corral-route"},
        init=init,
        min_size=1,
        max_size=1,
    )
    db = sandbox(pool, mode="sandbox")
    await db.create_sandbox()
    try:
        row = await db.fetchrow(
            f"SELECT ({WHERE}) AS addr, current_database() AS db, current_user AS usr,"
            " current_setting('application_name') AS app"
        )
        assert tuple(row) == (None, dbname, "postgres", "corral-route")
        assert inits == ["127.0.0.1", None]  # the pool's init ran on the new connection
    finally:
        await db.close_sandbox()
        await db.close()


@pytest.mark.asyncio
async def test_a_users_server_is_never_rerouted(url_pool: Any) -> None:
    """No route (--corral-dsn, or a server corral did not start): TCP, as configured."""
    db = sandbox(url_pool, mode="sandbox")
    assert await _sandboxed_where(db) == "127.0.0.1"
    await db.close()


# ---------------------------------------------------------------- SQLAlchemy on asyncpg


@pytest.mark.asyncio
@pytest.mark.parametrize("with_route", [True, False])
async def test_an_asyncpg_engine_from_parts_sandboxes_on_the_socket(
    server: EphemeralPostgres, dbname: str, with_route: bool
) -> None:
    if with_route:
        add_socket_route(server.port, server.host)
    engine = create_async_engine(
        f"postgresql+asyncpg://postgres:{server.password}@127.0.0.1:{server.port}/{dbname}"
    )
    db = sandbox(engine, mode="sandbox")
    try:
        await db.create_sandbox()
        try:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO item (name) VALUES ('x')"))
            async with engine.connect() as conn:
                where = (await conn.execute(text(WHERE))).scalar()
                count = (await conn.execute(text("SELECT count(*) FROM item"))).scalar()
        finally:
            await db.close_sandbox()
        assert (where, count) == (None if with_route else "127.0.0.1", 1)
        db.mode = "normal"
        async with engine.connect() as conn:
            # The engine's own connections stay as configured; the sandbox rolled back.
            assert (await conn.execute(text(WHERE))).scalar() == "127.0.0.1"
            assert (await conn.execute(text("SELECT count(*) FROM item"))).scalar() == 0
    finally:
        remove_socket_route(server.port)
        await db.close()
        db.remove()
        await engine.dispose()
