"""The test patterns real apps use (issue 15), each an inner run end to end.

Every suite runs serially, on two workers, and in several random orders (pytest-randomly):
a pattern that works only in one order does not work.
"""

from __future__ import annotations

import os

import pytest

from corral._versions import installed, release

#: (-n, pytest-randomly seed or None): serially in file order, on two workers, shuffled.
#: CORRAL_TEST_ORDERS=N keeps the first N (.ci/run's second run, at the lowest versions,
#: keeps 2: serially in order and shuffled on two workers; the newest versions run all).
RUNS = [("0", None), ("2", 1), ("0", 2), ("2", 4)][: int(os.environ.get("CORRAL_TEST_ORDERS") or 4)]
RUN_IDS = [f"n{n}-" + ("ordered" if seed is None else f"seed{seed}") for n, seed in RUNS]


#: Below pytest-asyncio 1.0 a test's function-scoped loop is closed without cancelling its
#: tasks, so the connections corral kept on it cannot be closed on it: SQLAlchemy warns as
#: it collects them (an error under filterwarnings = error). docs/sandbox.md, "Patterns".
_LOOP_PER_TEST = pytest.mark.skipif(
    release(installed("pytest-asyncio") or "0") < (1,),
    reason="an event loop per test with async engines needs pytest-asyncio >= 1.0",
)

# Every test here is one inner run of one suite, in each of RUNS.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(360),  # an inner run on two workers, on a busy machine
    pytest.mark.parametrize(("workers", "seed"), RUNS, ids=RUN_IDS),
]


def run(
    inner: pytest.Pytester, name: str, suite: str, workers: str, seed: int | None
) -> pytest.RunResult:
    """Write *suite* as ``<name>.py`` in the inner directory and run it, in this order."""
    inner.makepyfile(**{name: suite})
    order = ["-p", "no:randomly"] if seed is None else ["-p", "randomly", f"--randomly-seed={seed}"]
    return inner.runpytest_subprocess("-n", workers, *order, f"{name}.py")


# ---------------------------------------------------------------------------- pattern 5

# Pattern 5: an event loop per test (anyio's default, pytest-asyncio's function loop
# scope), with async handles made once at import. Connections corral keeps between
# sandboxes belong to the loop that made them: the next test's loop never gets one.
LOOP_PER_TEST = """
import os

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import aapp
from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
on_asyncpg = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://", 1))
on_psycopg = create_async_engine(URL.replace("postgresql://", "postgresql+psycopg://", 1))
sandbox(on_asyncpg)
sandbox(on_psycopg)


@pytest.fixture
def anyio_backend():
    return "asyncio"  # function scope: a new runner, so a new loop, for each test


async def write_and_count(engine, name):
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM item"))).scalar()


@pytest.mark.anyio
@pytest.mark.parametrize("n", range(6))
async def test_anyio_loop_per_test(n):
    assert await write_and_count(on_asyncpg, "a") == 2
    assert await write_and_count(on_psycopg, "p") == 2  # its own connection: not "a"
    await aapp.add_item("f")
    assert await aapp.names() == ["seed", "f"]


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(6))
async def test_asyncio_loop_per_test(n):
    assert await write_and_count(on_asyncpg, "a") == 2
    assert await write_and_count(on_psycopg, "p") == 2
    await aapp.add_item("f")
    assert await aapp.names() == ["seed", "f"]
"""


@_LOOP_PER_TEST
def test_an_event_loop_per_test(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_loop_per_test", LOOP_PER_TEST, workers, seed).assert_outcomes(passed=12)


# ---------------------------------------------------------------------------- patterns 3, 4, 6

# The sync app of patterns 3 and 1 (their suites follow it): a FastAPI app on a sandboxed
# engine, a session per request, and a TestClient made without starlette's notice.
SYNC_APP = """
import os
import time
import warnings

import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
engine = create_engine(URL)
sandbox(engine)
app = FastAPI()


def get_session():
    with Session(engine) as session:
        yield session


@app.post("/items/{name}")
def add(name: str, session: Session = Depends(get_session)):
    session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    session.commit()
    return {"ok": True}


@app.get("/items")
def names(session: Session = Depends(get_session)):
    return [r[0] for r in session.execute(text("SELECT name FROM item ORDER BY id"))]


def new_client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette 1.x: "install httpx2 instead"
        from fastapi.testclient import TestClient

        return TestClient(app)
"""

# Pattern 3: a sync app behind a sync TestClient (its requests run on AnyIO worker
# threads and a portal loop), while the test holds its own open session. The per-test
# sandbox is shared by default; a session whose transaction only read lends the
# connection between statements; one holding uncommitted writes while it waits for a
# request is a deadlock, reported within a second.
THREADS = """

@pytest.fixture
def client():
    with new_client() as c:
        yield c


@pytest.fixture
def db():
    with Session(engine) as session:
        yield session


def count(db):
    return db.execute(text("SELECT count(*) FROM item")).scalar()


def test_a_request_while_the_test_holds_an_open_session(client, db):
    assert count(db) == 1  # the session's transaction stays open across the requests
    assert client.post("/items/a").status_code == 200
    assert client.get("/items").json() == ["seed", "a"]
    assert count(db) == 2  # READ COMMITTED: it sees what the app committed
    db.rollback()  # its own (read) transaction: the app's commit stays, as in production
    assert count(db) == 2


def test_the_test_commits_then_the_app_sees_it(client, db):
    db.execute(text("INSERT INTO item (name) VALUES ('t')"))
    db.commit()
    assert client.get("/items").json() == ["seed", "t"]
    assert client.post("/items/a").status_code == 200
    assert count(db) == 3


def test_uncommitted_writes_held_across_a_request_fail_fast(client, db):
    db.execute(text("INSERT INTO item (name) VALUES ('w')"))  # not committed
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        client.get("/items")
    assert time.monotonic() - started < 3
    assert "deadlock" in str(info.value), info.value
    assert "session held across a request" in str(info.value), info.value
    db.rollback()


def test_each_test_starts_clean(client):
    assert client.get("/items").json() == ["seed"]
"""


def test_threads_serving_the_app(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_threads", SYNC_APP + THREADS, workers, seed).assert_outcomes(passed=4)


# Pattern 2: several handles on one database. The app writes through a read-write engine
# and reads through a read-only one, the tests check through an engine of their own, and
# the sample's app module has a psycopg pool on the same database: all share the test's
# one connection and transaction, so a commit through one is seen through the others, and
# an open read transaction on one never undoes another's commit. own_connection=True
# keeps today's separate connection.
SEVERAL_HANDLES = """
import os
import warnings

import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

import app as pool_app
from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
rw, ro, tests_engine, apart = (create_engine(URL) for _ in range(4))
for engine in (rw, ro, tests_engine):
    sandbox(engine)
sandbox(apart, own_connection=True)
api = FastAPI()


@api.post("/items/{name}")
def add(name: str):
    with Session(rw) as session:
        session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
        session.commit()


@api.get("/items")
def names():
    with Session(ro) as session:
        return [r[0] for r in session.execute(text("SELECT name FROM item ORDER BY id"))]


@pytest.fixture
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette 1.x: "install httpx2 instead"
        from fastapi.testclient import TestClient

        with TestClient(api) as c:
            yield c


@pytest.fixture(scope="class")
def gadget():
    with Session(rw) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('gadget')"))
        session.commit()


def seen(engine):
    with Session(engine) as session:
        return [r[0] for r in session.execute(text("SELECT name FROM item ORDER BY id"))]


def test_a_write_through_rw_is_read_through_ro(client):
    assert client.post("/items/a").status_code == 200
    assert client.get("/items").json() == ["seed", "a"]
    assert seen(tests_engine) == ["seed", "a"]


def test_the_app_sees_what_the_test_commits(client):
    with Session(tests_engine) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('t')"))
        session.commit()
    assert client.get("/items").json() == ["seed", "t"]


def test_an_open_read_transaction_never_undoes_a_commit():
    with Session(ro) as reader:
        assert reader.execute(text("SELECT count(*) FROM item")).scalar() == 1
        with Session(rw) as writer:
            writer.execute(text("INSERT INTO item (name) VALUES ('w')"))
            writer.commit()
        assert reader.execute(text("SELECT count(*) FROM item")).scalar() == 2
    assert seen(tests_engine) == ["seed", "w"]  # the reader's rollback left it


def test_a_psycopg_pool_beside_an_engine(client):
    pool_app.add_item("p")
    assert client.get("/items").json() == ["seed", "p"]
    assert client.post("/items/q").status_code == 200
    assert pool_app.names() == ["seed", "p", "q"]


class TestAClassScope:
    def test_its_fixtures_commit_is_seen_by_every_handle(self, gadget, client):
        assert client.get("/items").json() == ["seed", "gadget"]
        assert pool_app.names() == ["seed", "gadget"]


def test_each_test_starts_clean(client):
    assert client.get("/items").json() == ["seed"]
    assert pool_app.names() == ["seed"]


def test_own_connection_keeps_a_transaction_of_its_own():
    with Session(rw) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('x')"))
        session.commit()
    with Session(apart) as session:
        session.execute(text("INSERT INTO item (name) VALUES ('y')"))
        session.commit()
        assert [r[0] for r in session.execute(text("SELECT name FROM item"))] == ["seed", "y"]
    assert seen(tests_engine) == ["seed", "x"]
"""


def test_several_handles_on_one_database(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_handles", SEVERAL_HANDLES, workers, seed).assert_outcomes(passed=7)


# Patterns 4 and 6: an async app whose endpoint gathers over two AsyncSessions, behind a
# Starlette BaseHTTPMiddleware (each request in a child task), called while the test's
# fixture session holds the connection.
TASKS = """
import asyncio
import os
import time

import httpx
import pytest
import pytest_asyncio
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from starlette.middleware.base import BaseHTTPMiddleware

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
engine = create_async_engine(URL)
sandbox(engine)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request, call_next):
        return await call_next(request)


app = FastAPI()
app.add_middleware(Passthrough)


async def get_session():
    async with Session() as session:
        yield session


@app.post("/items/{name}")
async def add(name: str, session=Depends(get_session)):
    await session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    await session.commit()
    return {"ok": True}


@app.get("/page")
async def page():
    async def names():
        async with Session() as s:
            return [r[0] for r in await s.execute(text("SELECT name FROM item ORDER BY id"))]

    async def total():
        async with Session() as s:
            return (await s.execute(text("SELECT count(*) FROM item"))).scalar()

    items, n = await asyncio.gather(names(), total())
    return {"items": items, "total": n}


@pytest_asyncio.fixture
async def db():
    async with Session() as session:
        yield session


def client():
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def messages(exc):
    out = [str(exc)]
    for sub in getattr(exc, "exceptions", ()):
        out += messages(sub)
    if exc.__cause__ is not None:
        out += messages(exc.__cause__)
    return " | ".join(out)


async def count(db):
    return (await db.execute(text("SELECT count(*) FROM item"))).scalar()


@pytest.mark.asyncio
async def test_gather_behind_middleware_while_a_fixture_session_reads(db):
    assert await count(db) == 1
    async with client() as c:
        assert (await c.post("/items/a")).status_code == 200
        assert (await c.get("/page")).json() == {"items": ["seed", "a"], "total": 2}
    assert await count(db) == 2
    await db.rollback()  # its own (read) transaction: the app's commit stays
    assert await count(db) == 2


@pytest.mark.asyncio
async def test_a_fixture_commit_is_seen_by_the_app(db):
    await db.execute(text("INSERT INTO item (name) VALUES ('f')"))
    await db.commit()
    async with client() as c:
        assert (await c.get("/page")).json() == {"items": ["seed", "f"], "total": 2}


@pytest.mark.asyncio
async def test_uncommitted_writes_while_awaiting_a_request_fail_fast(db):
    await db.execute(text("INSERT INTO item (name) VALUES ('w')"))
    started = time.monotonic()
    async with client() as c:
        with pytest.raises(BaseException) as info:
            await c.get("/page")
    assert time.monotonic() - started < 3
    assert "deadlock" in messages(info.value), messages(info.value)
    await db.rollback()


@pytest.mark.asyncio
async def test_each_test_starts_clean():
    async with client() as c:
        assert (await c.get("/page")).json() == {"items": ["seed"], "total": 1}
"""


@_LOOP_PER_TEST
def test_tasks_serving_the_app(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_tasks", TASKS, workers, seed).assert_outcomes(passed=4)


# ---------------------------------------------------------------------------- pattern 7

# Pattern 7: a sync test requesting async fixtures that write through an async handle;
# pytest-asyncio runs them on its loop. The async sandboxes are open for them too.
SYNC_TEST_ASYNC_FIXTURE = """
import os

import psycopg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]
engine = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://", 1))
sandbox(engine)


async def names():
    async with engine.connect() as conn:
        return [r[0] for r in await conn.execute(text("SELECT name FROM item ORDER BY id"))]


def committed():
    with psycopg.connect(URL) as other:
        return [r[0] for r in other.execute("SELECT name FROM item ORDER BY id")]


@pytest_asyncio.fixture
async def gadget():
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO item (name) VALUES ('gadget')"))
    yield "gadget"
    assert await names() == ["seed", "gadget"]  # teardown: still inside the sandbox


@pytest.mark.parametrize("n", range(3))
def test_a_sync_test_with_an_async_fixture(gadget, n):
    # The same unique name each time: a row left behind would fail the next insert.
    assert gadget == "gadget"
    assert committed() == ["seed"]


@pytest.mark.asyncio
async def test_an_async_test_after_it():
    assert await names() == ["seed"]
"""


@_LOOP_PER_TEST
def test_a_sync_test_with_async_fixtures(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_sync_async", SYNC_TEST_ASYNC_FIXTURE, workers, seed).assert_outcomes(passed=4)


# ---------------------------------------------------------------------------- pattern 1, async

# Pattern 1 with async fixtures: a session-scoped async fixture writing through an async
# engine on pytest-asyncio's session loop, and tests on that loop. The plugin opens the
# async handles' outer sandbox for the scope on its loop; each test nests inside it.
ASYNC_SCOPES = """
import os

import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
engine = create_async_engine(URL)
sandbox(engine)
session_loop = pytest.mark.asyncio(loop_scope="session")


async def names():
    async with engine.connect() as conn:
        return [r[0] for r in await conn.execute(text("SELECT name FROM item ORDER BY id"))]


async def add(name):
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def admin():
    await add("admin")
    yield "admin"


@pytest_asyncio.fixture(scope="class", loop_scope="session")
async def gadget(admin):
    await add("gadget")


@session_loop
async def test_sees_the_session_fixtures_data(admin):
    assert await names() == ["seed", "admin"]
    await add("t")
    assert await names() == ["seed", "admin", "t"]


@session_loop
async def test_each_test_starts_from_the_fixtures_data(admin):
    assert await names() == ["seed", "admin"]


class TestAClassScope:
    @session_loop
    async def test_its_fixture_nests_inside(self, gadget):
        assert await names() == ["seed", "admin", "gadget"]
        await add("u")

    @session_loop
    async def test_its_fixtures_data_stays_for_the_class(self, gadget):
        assert await names() == ["seed", "admin", "gadget"]
"""


def test_async_scope_fixtures(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    run(inner, "test_async_scopes", ASYNC_SCOPES, workers, seed).assert_outcomes(passed=4)


# A no_sandbox test among them: the async scope levels (session, and class nested in it on
# the same connection) are closed on their loop before it commits for real; its database
# is replaced afterwards, the scopes' data with it. Assertions hold in any order.
ASYNC_SCOPES_NO_SANDBOX = (
    ASYNC_SCOPES.split("@session_loop", 1)[0]
    + """
class TestWithANoSandboxTest:
    @session_loop
    async def test_sandboxed(self, gadget):
        await add("u")
        assert "n" not in await names()

    @session_loop
    @pytest.mark.no_sandbox
    async def test_commits_for_real(self, gadget):
        assert "u" not in await names()
        await add("n")
        assert (await names())[-1] == "n"


@session_loop
async def test_nothing_leaked(admin):
    assert not {"n", "u"} & set(await names())
"""
)


def test_async_scope_fixtures_and_no_sandbox(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    if (workers, seed) not in RUNS[:2]:
        pytest.skip("two runs are enough here (CI time): serial in order, two workers shuffled")
    suite = ASYNC_SCOPES_NO_SANDBOX
    run(inner, "test_async_no_sandbox", suite, workers, seed).assert_outcomes(passed=3)


# ---------------------------------------------------------------------------- pattern 1

# Pattern 1: a session-scoped ORM session shared by every test (the most popular FastAPI
# template's layout), the user's fixtures unchanged: no sandboxed() around them. The
# plugin opens an outer sandbox for each fixture scope; each test nests inside.
LONG_LIVED_SESSION = """

@pytest.fixture(scope="session")
def db():
    with Session(engine) as session:
        yield session


@pytest.fixture(scope="session", autouse=True)
def superuser(db):
    db.execute(text("INSERT INTO item (name) VALUES ('admin')"))
    db.commit()


@pytest.fixture(scope="module")
def client():
    with new_client() as c:
        yield c


def count(db, name):
    return db.execute(text("SELECT count(*) FROM item WHERE name = :n"), {"n": name}).scalar()


def test_uses_session(db):
    db.execute(text("INSERT INTO item (name) VALUES ('x')"))
    db.commit()
    assert count(db, "x") == 1


def test_uses_session_again(db):
    assert db.execute(text("SELECT count(*) FROM item WHERE name='x'")).scalar() == 0


def test_leaves_its_transaction_open(db):
    db.execute(text("INSERT INTO item (name) VALUES ('y')"))  # never committed
    assert count(db, "y") == 1


def test_after_an_open_transaction(db):
    assert count(db, "y") == 0


def test_a_request_sees_the_session_fixtures_data(client, db):
    assert client.get("/items").json() == ["seed", "admin"]
    assert client.post("/items/r").status_code == 200
    assert count(db, "r") == 1


def test_the_session_fixtures_data_is_there_for_every_test(db):
    assert count(db, "admin") == 1
    assert count(db, "r") == 0


@pytest.fixture(scope="class")
def gadget(db):
    # At module level: pytest 9.1 deprecates class-scoped fixtures as instance methods.
    db.execute(text("INSERT INTO item (name) VALUES ('gadget')"))
    db.commit()


class TestAClassScope:
    def test_one(self, gadget, db):
        assert count(db, "gadget") == 1
        db.execute(text("DELETE FROM item WHERE name = 'gadget'"))
        db.commit()

    def test_two(self, gadget, db):
        assert count(db, "gadget") == 1  # the class's data, as its fixture left it


def test_a_class_scope_is_rolled_back_when_it_ends(db):
    assert count(db, "gadget") == 0
"""


def test_a_session_scoped_orm_session(
    inner: pytest.Pytester, shared_server: str, workers: str, seed: int | None
) -> None:
    suite = SYNC_APP + LONG_LIVED_SESSION
    run(inner, "test_long_lived", suite, workers, seed).assert_outcomes(passed=9)
