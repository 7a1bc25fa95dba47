"""Template databases and clones on a real server: build once, reuse, fail clean, clone fast."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from corral.errors import (
    EmptyTemplate,
    PostgresDriverMissing,
    PostgresError,
    TemplateBuildError,
)
from corral.postgres import (
    EphemeralPostgres,
    clone_database,
    database_dsn,
    drop_database,
    drop_stale_databases,
    ensure_template,
    list_databases,
    schema_hash,
    template_name,
)
from corral.postgres._admin import admin, conninfo_params
from corral.postgres._databases import _end_sessions, make_mark, set_mark


@pytest.fixture(scope="module")
def admin_dsn() -> Iterator[str]:
    # One server for the module: each test uses its own schema, so they do not collide.
    with EphemeralPostgres() as server:
        yield server.dsn


def _databases(dsn: str) -> dict[str, bool]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT datname, datistemplate FROM pg_database").fetchall()
    return dict(rows)


def _schema(tmp_path: Path, body: str, name: str = "001_schema.sql") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


_USERS = "CREATE TABLE users (id serial PRIMARY KEY, name text UNIQUE NOT NULL);"
_SEED = "INSERT INTO users (name) VALUES ('ada'), ('grace');"


def test_template_is_built_marked_and_cloned(admin_dsn: str, tmp_path: Path) -> None:
    files = [_schema(tmp_path, _USERS), _schema(tmp_path, _SEED, "002_seed.sql")]
    name = ensure_template(admin_dsn, files)
    assert name == template_name(files)
    assert name.startswith("corral_tpl_")
    assert _databases(admin_dsn)[name] is True
    with psycopg.connect(admin_dsn) as conn:
        (allow,) = conn.execute(  # type: ignore[misc]
            "SELECT datallowconn FROM pg_database WHERE datname = %s", [name]
        ).fetchone()
    assert allow is False  # no session can block a clone
    clone = clone_database(admin_dsn, name)
    with psycopg.connect(database_dsn(admin_dsn, clone)) as conn:
        assert conn.execute("SELECT name FROM users ORDER BY id").fetchall() == [
            ("ada",),
            ("grace",),
        ]
    marks = {db.name: db for db in list_databases(admin_dsn)}
    assert marks[name].kind == "template"
    assert marks[name].state == "ready"
    assert marks[clone].kind == "clone"
    assert marks[clone].template == name
    assert drop_database(admin_dsn, clone) is True
    assert clone not in _databases(admin_dsn)


def test_unchanged_schema_is_reused(admin_dsn: str, tmp_path: Path) -> None:
    calls: list[str] = []

    def migrate(dsn: str) -> None:
        calls.append(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE reused (id int)")

    watched = _schema(tmp_path, "-- v1")
    first = ensure_template(admin_dsn, migrate, watch=[watched])
    second = ensure_template(admin_dsn, migrate, watch=[watched])
    assert first == second
    assert len(calls) == 1


def test_schema_change_produces_a_new_template(admin_dsn: str, tmp_path: Path) -> None:
    path = _schema(tmp_path, _USERS)
    old = ensure_template(admin_dsn, [path])
    path.write_text(_USERS + "\nALTER TABLE users ADD COLUMN email text;")
    new = ensure_template(admin_dsn, [path])
    assert new != old
    databases = _databases(admin_dsn)
    assert databases[old]
    assert databases[new]
    clone = clone_database(admin_dsn, new)
    with psycopg.connect(database_dsn(admin_dsn, clone)) as conn:
        conn.execute("SELECT email FROM users")
    drop_database(admin_dsn, clone)


def test_hash_covers_contents_order_and_watched_files(tmp_path: Path) -> None:
    a, b = _schema(tmp_path, "SELECT 1;", "a.sql"), _schema(tmp_path, "SELECT 2;", "b.sql")
    assert schema_hash([a, b]) == schema_hash([a, b])
    assert schema_hash([a, b]) != schema_hash([b, a])
    assert schema_hash(tmp_path) == schema_hash([a, b])  # a directory runs its *.sql sorted
    watched = tmp_path / "versions"
    watched.mkdir()
    (watched / "001.py").write_text("x = 1")
    before = schema_hash([a], watch=[watched])
    (watched / "002.py").write_text("y = 2")
    assert schema_hash([a], watch=[watched]) != before


def test_broken_sql_leaves_nothing_and_carries_the_error(admin_dsn: str, tmp_path: Path) -> None:
    good = _schema(tmp_path, _USERS)
    bad = _schema(tmp_path, "CREATE TABLE posts (user_id int REFERENCES nope);", "002_bad.sql")
    name = template_name([good, bad])
    with pytest.raises(TemplateBuildError) as info:
        ensure_template(admin_dsn, [good, bad])
    assert info.value.template == name
    assert info.value.source == str(bad)
    assert "002_bad.sql" in str(info.value)
    assert "nope" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
    assert name not in _databases(admin_dsn)
    # Fixing the file builds a (different) template normally.
    bad.write_text("CREATE TABLE posts (user_id int REFERENCES users);")
    assert ensure_template(admin_dsn, [good, bad]) in _databases(admin_dsn)


def test_failing_callable_leaves_nothing(admin_dsn: str) -> None:
    left_open: list[psycopg.Connection] = []

    def migrate(dsn: str) -> None:
        # An open connection to the half-built database must not stop the clean-up.
        left_open.append(psycopg.connect(dsn, autocommit=True))
        left_open[0].execute("CREATE TABLE half (id int)")
        raise RuntimeError("migration 0042 failed")

    name = template_name(migrate)
    try:
        with pytest.raises(TemplateBuildError, match="migration 0042 failed") as info:
            ensure_template(admin_dsn, migrate)
    finally:
        left_open[0].close()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert name not in _databases(admin_dsn)


@pytest.mark.parametrize(
    "created",
    [
        "CREATE TABLE t (id int)",
        "CREATE VIEW v AS SELECT 1 AS one",
        "CREATE SEQUENCE s",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TYPE mood AS ENUM ('ok')",
        "CREATE SCHEMA app",
    ],
)
def test_a_step_that_creates_anything_passes_the_check(admin_dsn: str, created: str) -> None:
    def migrate(dsn: str) -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute(created)

    migrate.__qualname__ = f"migrate_{abs(hash(created))}"  # a template per case
    name = ensure_template(admin_dsn, migrate, require_objects=True)
    assert name in _databases(admin_dsn)
    drop_database(admin_dsn, name)


def test_a_step_that_creates_nothing_fails_and_leaves_nothing(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE corral_test_elsewhere")

    def migrate(dsn: str) -> None:
        # Migrates another database, as an env.py reading the app's settings does.
        with psycopg.connect(database_dsn(admin_dsn, "corral_test_elsewhere")) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS t (id int)")

    name = template_name(migrate)
    try:
        with pytest.raises(EmptyTemplate, match="ran but created nothing") as info:
            ensure_template(admin_dsn, migrate, require_objects=True)
        assert isinstance(info.value, TemplateBuildError)
        assert info.value.template == name
        assert name not in _databases(admin_dsn)
        # Not asked to check (no schema step, by the plugin's rule): an empty template.
        assert ensure_template(admin_dsn, migrate) == name
        drop_database(admin_dsn, name)
    finally:
        drop_database(admin_dsn, "corral_test_elsewhere")


def test_half_built_template_of_a_killed_build_is_replaced(admin_dsn: str, tmp_path: Path) -> None:
    path = _schema(tmp_path, _USERS + "\n-- killed build")
    name = template_name([path])
    with admin(admin_dsn) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        set_mark(conn, name, make_mark("template", owner_pid=2**22 + 1, state="building"))
    assert ensure_template(admin_dsn, [path]) == name
    assert _databases(admin_dsn)[name] is True
    clone = clone_database(admin_dsn, name)
    with psycopg.connect(database_dsn(admin_dsn, clone)) as conn:
        conn.execute("SELECT count(*) FROM users")
    drop_database(admin_dsn, clone)


def test_clone_ends_sessions_on_a_template_in_use(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE user_made_template")
    blocker = psycopg.connect(database_dsn(admin_dsn, "user_made_template"))
    try:
        clone = clone_database(admin_dsn, "user_made_template", timeout=10)
    finally:
        blocker.close()
    assert clone in _databases(admin_dsn)
    drop_database(admin_dsn, clone)
    drop_database(admin_dsn, "user_made_template")


def test_clone_errors_say_what_to_do(admin_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(PostgresError, match="ensure_template"):
        clone_database(admin_dsn, "corral_tpl_missing")
    template = ensure_template(admin_dsn, [_schema(tmp_path, _USERS)])
    taken = clone_database(admin_dsn, template)
    with pytest.raises(PostgresError, match="exists"):
        clone_database(admin_dsn, template, name=taken)
    drop_database(admin_dsn, taken)


def test_drop_right_after_disconnect_and_while_connected(admin_dsn: str, tmp_path: Path) -> None:
    template = ensure_template(admin_dsn, [_schema(tmp_path, _USERS)])
    first, second = clone_database(admin_dsn, template), clone_database(admin_dsn, template)
    with psycopg.connect(database_dsn(admin_dsn, first)) as conn:
        conn.execute("SELECT 1")
    drop_database(admin_dsn, first)  # the backend may still be exiting
    live = psycopg.connect(database_dsn(admin_dsn, second))
    try:
        drop_database(admin_dsn, second)  # its session is ended
    finally:
        live.close()
    databases = _databases(admin_dsn)
    assert first not in databases
    assert second not in databases
    assert drop_database(admin_dsn, "never_existed") is False


def test_ending_sessions_waits_until_their_backends_are_gone(
    admin_dsn: str, tmp_path: Path
) -> None:
    # Idle and idle-in-transaction sessions are ended and gone when it returns (what it
    # saves, DROP DATABASE's own 100 ms re-checks, is a benchmark row: postgres_start).
    template = ensure_template(admin_dsn, [_schema(tmp_path, _USERS)])
    clone = clone_database(admin_dsn, template)
    idle = psycopg.connect(database_dsn(admin_dsn, clone))
    busy = psycopg.connect(database_dsn(admin_dsn, clone))
    busy.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # idle in transaction
    try:
        with admin(admin_dsn) as conn:
            assert _end_sessions(conn, clone) == 2
            [(left,)] = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [clone]
            )
            assert left == 0
            assert _end_sessions(conn, clone) == 0
        with pytest.raises(psycopg.OperationalError):
            busy.execute("SELECT 1")
    finally:
        idle.close()
        busy.close()
    assert drop_database(admin_dsn, clone) is True
    assert clone not in _databases(admin_dsn)


def test_stale_clean_up_only_touches_marked_databases_of_dead_owners(
    admin_dsn: str, tmp_path: Path
) -> None:
    template = ensure_template(admin_dsn, [_schema(tmp_path, _USERS)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = clone_database(admin_dsn, template, owner_pid=dead.pid)
    mine = clone_database(admin_dsn, template)
    of_run = clone_database(admin_dsn, template, run_id="run-42")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE users_own_db")
        conn.execute("COMMENT ON DATABASE users_own_db IS 'not corral''s'")
    dropped = drop_stale_databases(admin_dsn)
    assert dropped == [orphan]
    assert drop_stale_databases(admin_dsn, run_id="run-42") == [of_run]
    databases = _databases(admin_dsn)
    assert mine in databases
    assert template in databases  # ready templates are reused across runs
    assert "users_own_db" in databases
    drop_database(admin_dsn, mine)
    drop_database(admin_dsn, "users_own_db")


_WORKER = textwrap.dedent(
    """
    import json, sys
    import psycopg
    from corral.postgres import clone_database, database_dsn, ensure_template

    admin, schema, log = sys.argv[1], sys.argv[2], sys.argv[3]

    def migrate(dsn):
        with open(log, "a") as f:
            f.write("built\\n")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(open(schema).read())

    template = ensure_template(admin, migrate, watch=[schema])
    names = []
    for _ in range(5):
        name = clone_database(admin, template)
        with psycopg.connect(database_dsn(admin, name)) as conn:
            conn.execute("INSERT INTO users (name) VALUES ('x')")
            (count,) = conn.execute("SELECT count(*) FROM users").fetchone()
        assert count == 3, count
        names.append(name)
    print(json.dumps({"template": template, "clones": names}))
    """
)


@pytest.mark.slow
def test_four_processes_build_once_and_clone_concurrently(admin_dsn: str, tmp_path: Path) -> None:
    schema = _schema(tmp_path, _USERS + "\n" + _SEED)
    build_log = tmp_path / "builds.log"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, admin_dsn, str(schema), str(build_log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=90)
        assert worker.returncode == 0, err
        results.append(json.loads(out))
    assert build_log.read_text().count("built") == 1
    assert len({r["template"] for r in results}) == 1
    clones = [name for r in results for name in r["clones"]]
    assert len(set(clones)) == 20
    databases = _databases(admin_dsn)
    assert all(name in databases for name in clones)
    for name in clones:
        drop_database(admin_dsn, name)


def test_database_dsn_rewrites_only_the_database() -> None:
    url = "postgresql://postgres@/postgres?host=/tmp/x&port=5432"
    assert database_dsn(url, "db1") == "postgresql://postgres@/db1?host=/tmp/x&port=5432"
    sa = "postgresql+psycopg://u:p@localhost:5433/app?sslmode=disable"
    assert (
        database_dsn(sa, "other") == "postgresql+psycopg://u:p@localhost:5433/other?sslmode=disable"
    )
    assert "dbname=x2" in database_dsn("postgresql://h/?dbname=x1&user=u", "x2")
    kv = database_dsn("host=/tmp/x port=5432 user=postgres dbname=postgres", "db2")
    assert psycopg.conninfo.conninfo_to_dict(kv) == {
        "host": "/tmp/x",
        "port": "5432",
        "user": "postgres",
        "dbname": "db2",
    }


def test_missing_drivers_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes `import psycopg` fail
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(PostgresDriverMissing, match=r"pip install 'corral\[psycopg\]'") as info:
        clone_database("postgresql:///postgres", "anything")
    assert isinstance(info.value, ImportError)


def test_asyncpg_alone_builds_clones_and_drops(
    admin_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An app on asyncpg only: the admin work runs on asyncpg (its own event loop).
    monkeypatch.setitem(sys.modules, "psycopg", None)
    path = _schema(tmp_path, _USERS + "\n-- asyncpg alone")
    template = ensure_template(admin_dsn, [path])
    assert ensure_template(admin_dsn, [path]) == template  # found and reused
    clone = clone_database(admin_dsn, template)
    assert {db.name for db in list_databases(admin_dsn)} >= {template, clone}
    broken = _schema(tmp_path, "CREATE TABLE t (id int REFERENCES nowhere(id));", "2.sql")
    with pytest.raises(TemplateBuildError, match="UndefinedTableError") as info:
        ensure_template(admin_dsn, [broken])
    assert type(info.value.__cause__).__module__.startswith("asyncpg")
    monkeypatch.delitem(sys.modules, "psycopg")
    assert _databases(admin_dsn)[template] is True
    with psycopg.connect(database_dsn(admin_dsn, clone)) as conn:
        conn.execute("SELECT count(*) FROM users")
    monkeypatch.setitem(sys.modules, "psycopg", None)
    assert drop_database(admin_dsn, clone) is True
    assert drop_database(admin_dsn, clone) is False
    assert drop_database(admin_dsn, template) is True


def test_asyncpg_admin_work_from_async_code(
    admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A running loop in the calling thread: the private loop runs in a helper thread.
    monkeypatch.setitem(sys.modules, "psycopg", None)

    async def main() -> list[str]:
        return [db.name for db in list_databases(admin_dsn)]

    assert isinstance(asyncio.run(main()), list)


def test_dsn_parts_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    url = "postgresql+asyncpg://app:s%40cret@db.example:6543/my%20db?sslmode=disable"
    assert conninfo_params(url) == {
        "host": "db.example",
        "port": "6543",
        "user": "app",
        "password": "s@cret",
        "dbname": "my db",
        "sslmode": "disable",
    }
    socket = conninfo_params("postgresql://postgres@:5432/db?host=/run/pg")
    assert socket == {"host": "/run/pg", "port": "5432", "user": "postgres", "dbname": "db"}
