"""What a sandbox costs per test, side by side with the other ways to isolate tests.

Run: ``python -m benchmarks.sandbox_overhead [--rounds 300] [--dsn DSN] [--png PATH]``.
Without ``--dsn`` (or ``CORRAL_BENCH_DSN``) it starts corral's throwaway PostgreSQL, and
``--transport tcp`` runs it over 127.0.0.1 instead of the Unix socket; ``--transport both``
prints TCP and the URL the pytest plugin hands out (a host and a port, the socket
directory in the query) against the socket side by side (:mod:`benchmarks.transport_compare`).
All strategies run in one process against the same server and database, in blocks of
consecutive runs cycled so that drift in machine load hits them alike. Medians; ratios
against the bare driver's ``BEGIN``/``ROLLBACK`` on one connection, block by block.
Like the pytest plugin by default, the process and its backends share one CPU
(``--no-colocate``: they float, and the figures swing with how busy the machine is).
Target (issue 3): sandbox create+close <= 1.5x. Issue 6 adds every other adapter
(asyncpg, SQLAlchemy sync and asyncio on psycopg and asyncpg) next to its own driver's
bare ``BEGIN``/``ROLLBACK``, and the SQLAlchemy ORM next to SQLAlchemy's documented
"join a Session into an external transaction" recipe (``--only drivers`` runs just those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
import sqlalchemy
from psycopg import conninfo
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from corral.sandbox import sandbox

SCHEMA = """
CREATE TABLE users (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL,
    created timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL REFERENCES users,
    total numeric(10, 2) NOT NULL, status text NOT NULL DEFAULT 'new');
CREATE INDEX ON orders (user_id);
CREATE TABLE items (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders,
    sku text NOT NULL, qty int NOT NULL CHECK (qty > 0));
CREATE TABLE audit (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), what text);
CREATE TABLE tags (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
CREATE TABLE item_tags (item_id bigint REFERENCES items, tag_id int REFERENCES tags,
    PRIMARY KEY (item_id, tag_id));
"""
TABLES = ["item_tags", "tags", "audit", "items", "orders", "users"]
_counter = iter(range(1 << 62))


def workload(conn: Any) -> None:
    """A small test body: three app transactions, as an app would run them."""
    n = next(_counter)
    with conn.transaction():
        uid = conn.execute(
            "INSERT INTO users (email) VALUES (%s) RETURNING id", (f"u{n}@x",)
        ).fetchone()[0]
    with conn.transaction():
        oid = conn.execute(
            "INSERT INTO orders (user_id, total) VALUES (%s, 9.5) RETURNING id", (uid,)
        ).fetchone()[0]
        conn.execute("INSERT INTO items (order_id, sku, qty) VALUES (%s, 'a', 1)", (oid,))
    conn.execute("SELECT count(*) FROM orders WHERE user_id = %s", (uid,)).fetchone()


@contextlib.contextmanager
def server(dsn: str | None, transport: str = "socket") -> Iterator[str]:
    """The admin DSN: *dsn*, else a throwaway server's over *transport* (``socket``,
    ``tcp``; ``both`` yields the socket's, ``servers[...]`` holds the other)."""
    if dsn:
        yield dsn
        return
    from corral.postgres import EphemeralPostgres

    with EphemeralPostgres(tcp=transport != "socket") as pg:
        if transport != "socket":
            _TCP_ADMIN.append(pg.url)  # what the plugin hands out; tcp_dsn is its URL part
        yield pg.tcp_dsn if transport == "tcp" else pg.dsn


_TCP_ADMIN: list[str] = []


def admin_exec(dsn: str, *statements: str) -> None:
    with psycopg.Connection.connect(dsn, autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt.encode())


class Bench:
    def __init__(self, admin_dsn: str) -> None:
        self.admin = admin_dsn
        self.db = f"corral_bench_sandbox_{os.getpid()}"
        self.template = self.db + "_tpl"
        admin_exec(admin_dsn, *(f'DROP DATABASE IF EXISTS "{d}"' for d in (self.db, self.template)))
        admin_exec(admin_dsn, f'CREATE DATABASE "{self.template}"')
        admin_exec(self.dsn(self.template), SCHEMA)
        admin_exec(admin_dsn, f'CREATE DATABASE "{self.db}" TEMPLATE "{self.template}"')
        self.conn = psycopg.Connection.connect(self.dsn(self.db), autocommit=True)
        self.pool = psycopg_pool.ConnectionPool(self.dsn(self.db), min_size=1, max_size=2)
        self.pool.wait()
        self.sb: Any = sandbox(self.pool, mode="sandbox")
        self.clone = 0

    def dsn(self, name: str) -> str:
        return conninfo.make_conninfo(self.admin, dbname=name)

    def close(self) -> None:
        self.conn.close()
        self.pool.close()
        admin_exec(
            self.admin,
            f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)',
            f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)',
        )

    # ----------------------------------------------------------------- per-test strategies

    def bare_begin_rollback(self, body: bool) -> None:
        conn = self.conn
        conn.execute(b"BEGIN")
        if body:  # the app's transactions would commit here; savepoints stand in for them
            with conn.transaction():
                pass
            workload(conn)
        conn.execute(b"ROLLBACK")

    def sandbox_create_close(self, body: bool) -> None:
        self.sb.create_sandbox()
        if body:
            with self.sb.connection() as conn:
                workload(conn)
        self.sb.close_sandbox()

    def truncate(self, body: bool) -> None:
        if body:
            workload(self.conn)
        self.conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE".encode())

    def delete(self, body: bool) -> None:
        if body:
            workload(self.conn)
        with self.conn.transaction():
            for table in TABLES:
                self.conn.execute(f"DELETE FROM {table}".encode())

    def create_database_template(self, body: bool) -> None:
        self.clone += 1
        name = f"{self.db}_c{self.clone}"
        admin_exec(
            self.admin, f'CREATE DATABASE "{name}" TEMPLATE "{self.template}" STRATEGY FILE_COPY'
        )
        with psycopg.Connection.connect(self.dsn(name), autocommit=True) as conn:
            if body:
                workload(conn)
        admin_exec(self.admin, f'DROP DATABASE "{name}"')

    def schema_rebuild(self, body: bool) -> None:
        conn = self.conn
        if body:
            workload(conn)
        conn.execute(b"DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        conn.execute(SCHEMA.encode())

    # ----------------------------------------------------------------- per app transaction

    def tx_bare(self) -> None:
        with self.conn.transaction():
            self.conn.execute("INSERT INTO tags (name) VALUES (%s)", (f"t{next(_counter)}",))

    def tx_sandbox(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("INSERT INTO tags (name) VALUES (%s)", (f"t{next(_counter)}",))

    def stmt_bare(self) -> None:
        self.conn.execute("INSERT INTO tags (name) VALUES (%s)", (f"t{next(_counter)}",))

    def stmt_sandbox(self, conn: Any) -> None:
        conn.execute("INSERT INTO tags (name) VALUES (%s)", (f"t{next(_counter)}",))


# Co-location, as the pytest plugin does by default (corral_colocate): this process and
# the bench database's backends on one CPU. Without it the figures swing with how busy
# the other CPU is (on a VM a cross-CPU wake-up costs 5 µs on a busy machine and 50 µs
# on an idle one, several per test), which drowns the sandbox's own cost.
_COLOCATION: Any = None


def colocate(admin_dsn: str, database: str) -> str:
    """Pin this process to one CPU; backends are pinned as they appear (see pin())."""
    global _COLOCATION
    from corral._plugin._colocate import Colocation

    colocation, why = Colocation.plan("auto", admin_dsn, database, None, 1)
    if colocation is None:
        return f"not co-located: {why}"
    colocation.start()
    _COLOCATION = colocation
    return f"co-located on CPU {colocation.cpu} with the database's backends"


def pin() -> None:
    """Pin the bench database's backends opened since the last call (after warm-ups)."""
    if _COLOCATION is not None:
        _COLOCATION.pin_backends()


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_async(dsn: str, rounds: int) -> dict[str, list[float]]:
    async def main() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"async bare BEGIN/ROLLBACK": [], "async sandbox": []}
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
        await pool.open(wait=True)
        db: Any = sandbox(pool, mode="sandbox")
        await db.create_sandbox()
        await db.close_sandbox()
        pin()
        try:
            block = max(1, min(20, rounds // 10))
            for _ in range(max(1, rounds // block)):
                for _ in range(block):
                    t0 = time.perf_counter()
                    await conn.execute(b"BEGIN")
                    await conn.execute(b"ROLLBACK")
                    out["async bare BEGIN/ROLLBACK"].append(time.perf_counter() - t0)
                for _ in range(block):
                    t0 = time.perf_counter()
                    await db.create_sandbox()
                    await db.close_sandbox()
                    out["async sandbox"].append(time.perf_counter() - t0)
        finally:
            await conn.close()
            await pool.close()
        return out

    return asyncio.run(main())


# --------------------------------------------------------------------------- other drivers


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


def orm_body(session: Session) -> None:
    """Two ORM commits and a query: what a small test of a SQLAlchemy app does."""
    n = next(_counter)
    session.add(User(email=f"o{n}@x"))
    session.commit()
    session.add(User(email=f"p{n}@x"))
    session.commit()
    session.scalar(select(func.count()).select_from(User))


async def async_orm_body(session: AsyncSession) -> None:
    n = next(_counter)
    session.add(User(email=f"o{n}@x"))
    await session.commit()
    session.add(User(email=f"p{n}@x"))
    await session.commit()
    await session.scalar(select(func.count()).select_from(User))


def alternate(strategies: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time each strategy in blocks, cycling through them (see :func:`measure`)."""
    out: dict[str, list[float]] = {k: [] for k in strategies}
    block = max(1, min(20, rounds // 10))
    for cycle in range(max(1, rounds // block)):
        for name, fn in strategies.items():
            fn()  # warm
            if cycle == 0:
                pin()
            out[name].extend(timed(fn) for _ in range(block))
    return out


async def aalternate(
    strategies: dict[str, Callable[[], Awaitable[object]]], rounds: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in strategies}
    block = max(1, min(20, rounds // 10))
    for cycle in range(max(1, rounds // block)):
        for name, fn in strategies.items():
            await fn()
            if cycle == 0:
                pin()
            for _ in range(block):
                t0 = time.perf_counter()
                await fn()
                out[name].append(time.perf_counter() - t0)
    return out


def sa_url(dsn: str, driver: str) -> sqlalchemy.engine.URL:
    info = conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    return sqlalchemy.engine.URL.create(
        f"postgresql+{driver}",
        username=str(info.get("user") or "") or None,
        password=str(info.get("password") or "") or None,
        host=None if host.startswith("/") else host or None,
        port=int(str(info["port"])) if info.get("port") else None,
        database=str(info.get("dbname") or "") or None,
        query={"host": host} if host.startswith("/") else {},
    )


def run_sqlalchemy_sync(dsn: str, rounds: int) -> dict[str, list[float]]:
    raw = psycopg.Connection.connect(dsn, autocommit=True)
    engine = sqlalchemy.create_engine(sa_url(dsn, "psycopg"))  # the sandboxed app engine
    recipe_engine = sqlalchemy.create_engine(sa_url(dsn, "psycopg"))  # an untouched one
    db: Any = sandbox(engine, mode="sandbox")

    def bare() -> None:
        raw.execute(b"BEGIN")
        raw.execute(b"ROLLBACK")

    def corral(body: bool) -> None:
        db.create_sandbox()
        if body:
            with Session(engine) as session:
                orm_body(session)
        db.close_sandbox()

    def recipe(body: bool) -> None:
        # docs.sqlalchemy.org "Joining a Session into an External Transaction"
        with recipe_engine.connect() as conn:
            trans = conn.begin()
            session = Session(bind=conn, join_transaction_mode="create_savepoint")
            if body:
                orm_body(session)
            session.close()
            trans.rollback()

    try:
        return alternate(
            {
                "sqlalchemy: bare psycopg BEGIN/ROLLBACK": bare,
                "sqlalchemy: join-session recipe (empty)": lambda: recipe(False),
                "sqlalchemy: corral sandbox(engine) (empty)": lambda: corral(False),
                "sqlalchemy: join-session recipe + ORM body": lambda: recipe(True),
                "sqlalchemy: corral sandbox(engine) + ORM body": lambda: corral(True),
            },
            rounds,
        )
    finally:
        db.close()
        db.remove()
        engine.dispose()
        recipe_engine.dispose()
        raw.close()


def run_async_drivers(dsn: str, rounds: int) -> dict[str, list[float]]:
    import asyncpg

    async def main() -> dict[str, list[float]]:
        info = conninfo.conninfo_to_dict(dsn)
        params: dict[str, Any] = {
            "host": info.get("host"),
            "port": int(str(info.get("port") or 5432)),
            "user": info.get("user"),
            "database": info.get("dbname"),
        }
        out: dict[str, list[float]] = {}
        # asyncpg: sandbox(pool) next to BEGIN/ROLLBACK on a raw connection.
        raw = await asyncpg.connect(**params)
        pool = await asyncpg.create_pool(min_size=1, max_size=2, **params)
        db: Any = sandbox(pool, mode="sandbox")

        async def bare() -> None:
            await raw.execute("BEGIN")
            await raw.execute("ROLLBACK")

        async def corral_pool() -> None:
            await db.create_sandbox()
            await db.close_sandbox()

        async def corral_pool_body() -> None:
            await db.create_sandbox()
            async with db.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO users (email) VALUES ($1)", f"a{next(_counter)}")
            await db.fetchval("SELECT count(*) FROM users")
            await db.close_sandbox()

        async def bare_body() -> None:
            outer = raw.transaction()  # the test's transaction; the app's nests as a savepoint
            await outer.start()
            async with raw.transaction():
                await raw.execute("INSERT INTO users (email) VALUES ($1)", f"a{next(_counter)}")
            await raw.fetchval("SELECT count(*) FROM users")
            await outer.rollback()

        try:
            out.update(
                await aalternate(
                    {
                        "asyncpg: bare BEGIN/ROLLBACK": bare,
                        "asyncpg: corral sandbox(pool)": corral_pool,
                        "asyncpg: bare BEGIN/ROLLBACK + body": bare_body,
                        "asyncpg: corral sandbox(pool) + body": corral_pool_body,
                    },
                    rounds,
                )
            )
        finally:
            await db.close()
        praw = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

        async def bare_psycopg() -> None:
            await praw.execute(b"BEGIN")
            await praw.execute(b"ROLLBACK")

        bares = {"asyncpg": bare, "psycopg": bare_psycopg}

        # SQLAlchemy asyncio on each async driver: corral vs the join-session recipe.
        for driver in ("asyncpg", "psycopg"):
            engine = create_async_engine(sa_url(dsn, driver))
            recipe_engine = create_async_engine(sa_url(dsn, driver))
            adb: Any = sandbox(engine, mode="sandbox")
            p = f"sqlalchemy async ({driver})"

            async def corral(body: bool, engine: Any = engine, adb: Any = adb) -> None:
                await adb.create_sandbox()
                if body:
                    async with AsyncSession(engine) as session:
                        await async_orm_body(session)
                await adb.close_sandbox()

            async def recipe(body: bool, recipe_engine: Any = recipe_engine) -> None:
                async with recipe_engine.connect() as conn:
                    trans = await conn.begin()
                    session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint")
                    if body:
                        await async_orm_body(session)
                    await session.close()
                    await trans.rollback()

            try:
                out.update(
                    await aalternate(
                        {
                            f"{p}: bare {driver} BEGIN/ROLLBACK": bares[driver],
                            f"{p}: join-session recipe (empty)": functools.partial(recipe, False),
                            f"{p}: corral sandbox(engine) (empty)": functools.partial(
                                corral, False
                            ),
                            f"{p}: join-session recipe + ORM body": functools.partial(recipe, True),
                            f"{p}: corral sandbox(engine) + ORM body": functools.partial(
                                corral, True
                            ),
                        },
                        rounds,
                    )
                )
            finally:
                await adb.close()
                adb.remove()
                await engine.dispose()
                await recipe_engine.dispose()
        await raw.close()
        await praw.close()
        return out

    return asyncio.run(main())


DRIVER_GROUPS = [
    ("asyncpg, per test (empty)", "asyncpg: bare BEGIN/ROLLBACK",
     ["asyncpg: bare BEGIN/ROLLBACK", "asyncpg: corral sandbox(pool)"]),
    ("asyncpg, per test with a body", "asyncpg: bare BEGIN/ROLLBACK + body",
     ["asyncpg: bare BEGIN/ROLLBACK + body", "asyncpg: corral sandbox(pool) + body"]),
    ("SQLAlchemy (psycopg), per test (empty) vs the bare driver",
     "sqlalchemy: bare psycopg BEGIN/ROLLBACK",
     ["sqlalchemy: bare psycopg BEGIN/ROLLBACK", "sqlalchemy: join-session recipe (empty)",
      "sqlalchemy: corral sandbox(engine) (empty)"]),
    ("SQLAlchemy ORM (psycopg), per test vs the join-session recipe",
     "sqlalchemy: join-session recipe + ORM body",
     ["sqlalchemy: join-session recipe + ORM body",
      "sqlalchemy: corral sandbox(engine) + ORM body"]),
    *[
        (f"SQLAlchemy asyncio ({d}), per test (empty) vs the bare driver",
         f"sqlalchemy async ({d}): bare {d} BEGIN/ROLLBACK",
         [f"sqlalchemy async ({d}): bare {d} BEGIN/ROLLBACK",
          f"sqlalchemy async ({d}): join-session recipe (empty)",
          f"sqlalchemy async ({d}): corral sandbox(engine) (empty)"])
        for d in ("asyncpg", "psycopg")
    ],
    *[
        (f"SQLAlchemy asyncio ORM ({d}), per test vs the join-session recipe",
         f"sqlalchemy async ({d}): join-session recipe + ORM body",
         [f"sqlalchemy async ({d}): join-session recipe + ORM body",
          f"sqlalchemy async ({d}): corral sandbox(engine) + ORM body"])
        for d in ("asyncpg", "psycopg")
    ],
]  # fmt: skip


def run_handles(dsn: str, rounds: int) -> dict[str, list[float]]:
    """Issue 15: per test, what the plugin does with 1, 2 and 3 sandboxed sync handles on
    one database (a psycopg pool, a SQLAlchemy engine, a second pool): open a sandbox on
    each, share it, one read and one small write transaction through each, close.

    Side by side in one process: the handles sharing the test's connection (the default)
    and the same handles with ``own_connection=True`` (a connection each, as before
    handles shared one), so machine load moves both alike."""
    pools = [psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=2) for _ in range(4)]
    engines = [sqlalchemy.create_engine(sa_url(dsn, "psycopg")) for _ in range(2)]
    sets: dict[str, list[Any]] = {
        "": [sandbox(pools[0]), sandbox(engines[0]), sandbox(pools[1])],
        ", own connections": [
            sandbox(pools[2], own_connection=True),
            sandbox(engines[1], own_connection=True),
            sandbox(pools[3], own_connection=True),
        ],
    }
    on_engine = {
        id(handles[1]): engine for handles, engine in zip(sets.values(), engines, strict=True)
    }
    n = iter(range(1 << 62))

    def through(db: Any) -> None:
        engine = on_engine.get(id(db))
        if engine is not None:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT count(*) FROM users")).scalar()
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(f"INSERT INTO audit (what) VALUES ('e{next(n)}')"))
            return
        with db.connection() as conn:
            conn.execute("SELECT count(*) FROM users").fetchone()
        with db.connection() as conn:
            conn.execute("INSERT INTO audit (what) VALUES (%s)", (f"p{next(n)}",))

    def one_test(used: list[Any]) -> None:
        for db in used:
            db.create_sandbox()
            db.share()
        for db in used:
            through(db)
        for db in reversed(used):
            db.close_sandbox()

    try:
        return alternate(
            {
                f"{k} handle(s){label}: sandbox + body": functools.partial(one_test, used[:k])
                for k in (1, 2, 3)
                for label, used in sets.items()
            },
            rounds,
        )
    finally:
        for used in sets.values():
            for db in used:
                db.close()
        for engine in engines:
            engine.dispose()
        for pool in pools:
            pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--slow-rounds", type=int, default=20, help="for CREATE DATABASE etc.")
    parser.add_argument("--dsn", default=os.environ.get("CORRAL_BENCH_DSN"))
    parser.add_argument("--png", help="also draw the per-test table as a bar chart")
    parser.add_argument(
        "--no-colocate",
        dest="colocate",
        action="store_false",
        help="do not pin this process and its backends to one CPU (the plugin's default)",
    )
    parser.add_argument(
        "--only",
        choices=["psycopg", "drivers", "handles"],
        help="run one half (default: both), or only the per-test cost with 1-3 handles",
    )
    parser.add_argument(
        "--transport",
        choices=["socket", "tcp", "both"],
        default="socket",
        help="the throwaway server's Unix socket (default), 127.0.0.1, or both side by side "
        "with the URL the plugin hands out",
    )
    args = parser.parse_args(argv)
    if args.transport != "socket" and args.dsn:
        parser.error("--transport needs the throwaway server (no --dsn / CORRAL_BENCH_DSN)")

    rows: dict[str, list[float]] = {}
    with server(args.dsn, args.transport) as admin_dsn:
        bench = Bench(admin_dsn)
        where = colocate(admin_dsn, bench.db) if args.colocate else "not co-located: --no-colocate"
        print(f"# {where}")
        try:
            if args.transport == "both":
                from benchmarks import transport_compare

                compared = transport_compare.compare(bench, _TCP_ADMIN[-1], args.rounds)
                transport_compare.report(compared)
                return 0
            if args.only == "handles":
                rows = run_handles(bench.dsn(bench.db), args.rounds)
                for name, times in rows.items():
                    print(f"{name:40s} median {statistics.median(times) * 1e6:8.0f} us")
                return 0
            if args.only != "drivers":
                rows.update(measure(bench, args.rounds, args.slow_rounds))
                rows.update(run_async(bench.dsn(bench.db), args.rounds))
            if args.only != "psycopg":
                rows.update(run_sqlalchemy_sync(bench.dsn(bench.db), args.rounds))
                rows.update(run_async_drivers(bench.dsn(bench.db), args.rounds))
        finally:
            bench.close()
            if _COLOCATION is not None:
                _COLOCATION.stop()
    report(rows, args.png)
    return 0


def measure(bench: Bench, rounds: int, slow: int) -> dict[str, list[float]]:
    empty = {
        "bare BEGIN/ROLLBACK (empty test)": lambda: bench.bare_begin_rollback(False),
        "sandbox create+close (empty test)": lambda: bench.sandbox_create_close(False),
    }
    full = {
        "bare BEGIN/ROLLBACK + body": lambda: bench.bare_begin_rollback(True),
        "sandbox + body": lambda: bench.sandbox_create_close(True),
        "TRUNCATE all tables + body": lambda: bench.truncate(True),
        "DELETE all tables + body": lambda: bench.delete(True),
    }
    slow_ones = {
        "CREATE DATABASE ... TEMPLATE + body": lambda: bench.create_database_template(True),
        "schema rebuild + body": lambda: bench.schema_rebuild(True),
    }
    out: dict[str, list[float]] = {k: [] for k in (*empty, *full, *slow_ones)}
    # Blocks of consecutive runs per strategy, as a suite runs its tests back to back
    # (strictly alternating strategies would leave each one's backend cold), cycled so
    # that drift in machine load hits every strategy alike.
    block = max(1, min(20, rounds // 10))
    for cycle in range(max(1, rounds // block)):
        for name, fn in (*empty.items(), *full.items()):
            fn()  # warm
            if cycle == 0:
                pin()
            out[name].extend(timed(fn) for _ in range(block))
        if cycle * 2 < slow:
            for name, fn in slow_ones.items():
                out[name].extend(timed(fn) for _ in range(2))

    # Per app transaction / statement: production vs inside a sandbox.
    tx: dict[str, list[float]] = {
        "app transaction, bare (BEGIN..COMMIT)": [],
        "app transaction, sandbox (SAVEPOINT..RELEASE)": [],
        "autocommit statement, bare": [],
        "autocommit statement, sandbox": [],
    }
    bench.sb.create_sandbox()
    try:
        with bench.sb.connection() as conn:
            for _ in range(rounds):
                tx["app transaction, bare (BEGIN..COMMIT)"].append(timed(bench.tx_bare))
                tx["app transaction, sandbox (SAVEPOINT..RELEASE)"].append(
                    timed(lambda: bench.tx_sandbox(conn))
                )
            conn.autocommit = True
            for _ in range(rounds):
                tx["autocommit statement, bare"].append(timed(bench.stmt_bare))
                tx["autocommit statement, sandbox"].append(timed(lambda: bench.stmt_sandbox(conn)))
    finally:
        bench.sb.close_sandbox()
    # With deferrable constraints in the schema, each commit also checks them.
    checked: Any = sandbox(bench.pool, mode="sandbox", check_deferred=True)
    tx["app transaction, sandbox, deferred check"] = []
    tx["autocommit statement, sandbox, deferred check"] = []
    with checked.sandboxed(), checked.connection() as conn:
        for _ in range(rounds):
            tx["app transaction, sandbox, deferred check"].append(
                timed(lambda: bench.tx_sandbox(conn))
            )
        conn.autocommit = True
        for _ in range(rounds):
            tx["autocommit statement, sandbox, deferred check"].append(
                timed(lambda: bench.stmt_sandbox(conn))
            )
    out.update(tx)
    return out


def paired_ratio(rows: dict[str, list[float]], name: str, base: str) -> float:
    """Median over aligned blocks of (block median / baseline block median).

    Strategies ran in alternating blocks; comparing each block with its neighbour of
    the baseline cancels the load drift of a shared machine far better than one ratio
    of two overall medians.
    """
    a, b = rows[name], rows[base]
    if len(a) != len(b) or name == base:
        return statistics.median(a) / statistics.median(b)
    size = max(1, min(20, len(a) // 10))
    ratios = [
        statistics.median(a[i : i + size]) / statistics.median(b[i : i + size])
        for i in range(0, len(a) - size + 1, size)
    ]
    return statistics.median(ratios)


def report(rows: dict[str, list[float]], png: str | None) -> None:
    med = {k: statistics.median(v) * 1e6 for k, v in rows.items() if v}
    groups = [
        ("Per test, empty body", "bare BEGIN/ROLLBACK (empty test)", [
            "bare BEGIN/ROLLBACK (empty test)", "sandbox create+close (empty test)"]),
        ("Per test, asyncio, empty body", "async bare BEGIN/ROLLBACK", [
            "async bare BEGIN/ROLLBACK", "async sandbox"]),
        ("Per test with a 3-transaction body", "bare BEGIN/ROLLBACK + body", [
            "bare BEGIN/ROLLBACK + body", "sandbox + body", "TRUNCATE all tables + body",
            "DELETE all tables + body", "CREATE DATABASE ... TEMPLATE + body",
            "schema rebuild + body"]),
        ("Per app transaction", "app transaction, bare (BEGIN..COMMIT)", [
            "app transaction, bare (BEGIN..COMMIT)",
            "app transaction, sandbox (SAVEPOINT..RELEASE)",
            "app transaction, sandbox, deferred check"]),
        ("Per autocommit statement", "autocommit statement, bare", [
            "autocommit statement, bare", "autocommit statement, sandbox",
            "autocommit statement, sandbox, deferred check"]),
    ]  # fmt: skip
    groups += DRIVER_GROUPS
    for title, base, names in groups:
        if base not in med:
            continue
        print(f"\n{title}")
        width = max(48, *(len(n) for n in names))
        print(f"  {'strategy':<{width}} {'median':>12} {'ratio':>8} {'n':>5}")
        for name in names:
            if name in med:
                ratio = paired_ratio(rows, name, base)
                print(f"  {name:<{width}} {med[name]:>9.0f} us {ratio:>7.2f}x {len(rows[name]):>5}")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [n for _, _, ns in groups[2:3] for n in ns if n in med]
        if not names:
            return
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names, [med[n] / 1000 for n in names])
        ax.set_xscale("log")
        ax.set_xlabel("median ms per test (log scale)")
        ax.set_title("Test isolation cost per test (same server, same body)")
        fig.tight_layout()
        fig.savefig(png)
        print(f"\nwrote {png}")


if __name__ == "__main__":
    raise SystemExit(main())
