"""The plugin on a Redis broker: two pytest invocations ("machines") share one run.

Each inner invocation runs ``-n 2`` on this session's PostgreSQL and a real redis-server;
they are told apart by ``CORRAL_HOST`` (and their pids), as runners on two hosts would be.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from corral.postgres import clone_database, drop_database, list_databases
from tests._inner import inner_env, start_pytest
from tests.plugin._checks import redis_keys

pytestmark = pytest.mark.slow

# The schema is a function whose module source carries a fresh token: a template of its
# own for every test, so "built once" is observable (the build appends to a log).
_SCHEMA = """
import os
import psycopg

TOKEN = "{token}"


def build(dsn):
    with open(os.environ["BUILD_LOG"], "a") as log:
        log.write(f"{{os.getpid()}}\\n")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE item (id serial PRIMARY KEY, name text UNIQUE NOT NULL)")
"""

_CONFTEST = """
import os

import pytest
from psycopg_pool import ConnectionPool

from corral.sandbox import sandbox

# The application's pool, on this process's database (exported before conftest import).
pool = sandbox(ConnectionPool(os.environ["CORRAL_DATABASE_URL"], min_size=1, max_size=2, open=True))


@pytest.fixture(scope="session", autouse=True)
def all_workers_meet(corral):
    # Every worker of both machines arrives once: proof that they share one run, live.
    if os.environ.get("EXPECTED_WORKERS"):
        corral.barrier("all-workers", int(os.environ["EXPECTED_WORKERS"]), timeout=60)
"""

_TESTS = """
import json
import os

import psycopg
import pytest
from conftest import pool

from corral import Client


@pytest.mark.parametrize("n", range(8))
def test_shared_run(n, corral, corral_database_url):
    # The same unique name in every test: the sandbox rolls each one back.
    crash_marker = os.environ.get("CRASH_ONCE")
    if crash_marker and n == 3 and not os.path.exists(crash_marker):
        open(crash_marker, "w").close()
        os._exit(3)  # a worker dies mid-test (segfault, OOM kill)
    with pool.connection() as conn:
        conn.execute("INSERT INTO item (name) VALUES ('only-one')")
        assert conn.execute("SELECT count(*) FROM item").fetchone()[0] == 1
    plain = Client()  # what an application's own code gets
    try:
        facts = {
            "host": os.environ["CORRAL_HOST"],
            "pid": os.getpid(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER"),
            "database": psycopg.conninfo.conninfo_to_dict(corral_database_url)["dbname"],
            "fixture_client": type(corral).__name__,
            "plain_client": type(plain).__name__,
            "pipe": os.environ.get("EPHEMERAL_PIPE"),
            "run": json.loads(os.environ["CORRAL_PLUGIN_RUN"]),
            "first": corral.once("first-machine", lambda: os.environ["CORRAL_HOST"]),
        }
    finally:
        plain.close()
    with open(os.environ["FACTS"], "a") as out:
        out.write(json.dumps(facts) + "\\n")
"""


def _write_suite(path: Path) -> None:
    (path / "schema_fn.py").write_text(_SCHEMA.format(token=secrets.token_hex(8)))
    (path / "conftest.py").write_text(_CONFTEST)
    (path / "test_shared.py").write_text(_TESTS)
    (path / "pytest.ini").write_text(
        # The loop scope set: pytest-asyncio warns at start-up when it is unset, and
        # pytest >= 9.1 makes that warning a start-up error under filterwarnings = error.
        "[pytest]\ncorral_schema = schema_fn:build\nfilterwarnings = error\n"
        "asyncio_default_fixture_loop_scope = function\n"
    )


def test_two_machines_share_one_run(
    pytester: pytest.Pytester, redis_url: str, postgres_dsn: str
) -> None:
    _write_suite(pytester.path)
    run_id = f"ci-{secrets.token_hex(4)}"
    facts_file = pytester.path / "facts.jsonl"
    build_log = pytester.path / "builds.log"
    common = {
        "CORRAL_DSN": postgres_dsn,
        "FACTS": str(facts_file),
        "BUILD_LOG": str(build_log),
        "EXPECTED_WORKERS": "4",
    }
    # Machine A passes options; machine B only has the environment a CI job would set.
    # Each runs its half of the suite (4 tests: 2 for each of its workers).
    a = start_pytest(
        pytester.path,
        ["-n", "2", "--corral-broker", redis_url, "--corral-run-id", run_id,
         "--corral-machines", "2", "--corral-shard", "1/2", "-v"],
        inner_env(CORRAL_HOST="machine-a", **common),
    )  # fmt: skip
    b = start_pytest(
        pytester.path,
        ["-n", "2"],
        inner_env(
            CORRAL_HOST="machine-b",
            CORRAL_BROKER_URL=redis_url,
            CORRAL_RUN_ID=run_id,
            CORRAL_MACHINES="2",
            CORRAL_SHARD="2/2",
            **common,
        ),
    )
    out_a, _ = a.communicate(timeout=100)
    out_b, _ = b.communicate(timeout=100)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert "4 passed" in out_a
    assert "4 passed" in out_b
    assert f"broker: Redis run '{run_id}'" in out_a  # the -v report reads Redis
    assert "corral error" not in out_a + out_b  # every test ran once in the run

    facts: list[dict[str, Any]] = [json.loads(line) for line in facts_file.read_text().splitlines()]
    assert len(facts) == 8
    assert {f["fixture_client"] for f in facts} == {"RedisClient"}
    assert {f["plain_client"] for f in facts} == {"RedisClient"}
    assert {f["pipe"] for f in facts} == {None}  # no socket broker anywhere
    assert len({f["first"] for f in facts}) == 1  # one `once` for the whole run
    # Every worker process (2 per machine) has a database of its own, named after the run.
    by_process = {(f["host"], f["pid"]): f["database"] for f in facts}
    assert len(by_process) == 4
    assert {h for h, _ in by_process} == {"machine-a", "machine-b"}
    assert len(set(by_process.values())) == 4
    assert all(run_id in name for name in by_process.values())
    runs = {json.dumps(f["run"], sort_keys=True) for f in facts}
    assert len(runs) == 2  # one controller per machine...
    infos = [json.loads(r) for r in runs]
    assert {i["run_id"] for i in infos} == {run_id}
    assert len({i["controller_pid"] for i in infos}) == 2
    assert len({i["template"] for i in infos}) == 1  # ...one template
    assert len(build_log.read_text().split()) == 1, "the schema was built more than once"

    assert [
        db.name for db in list_databases(postgres_dsn) if db.run == run_id and db.kind == "clone"
    ] == []
    assert redis_keys(redis_url, run_id) == []  # the last machine out deleted the run
    drop_database(postgres_dsn, infos[0]["template"])


def test_a_machine_drops_only_its_own_clones(
    pytester: pytest.Pytester, redis_url: str, postgres_dsn: str
) -> None:
    # A machine that finishes while another still tests leaves that one's database alone
    # and does not delete the run's keys (it is not the last of --corral-machines 2).
    _write_suite(pytester.path)
    run_id = f"ci-{secrets.token_hex(4)}"
    common = {
        "CORRAL_DSN": postgres_dsn,
        "FACTS": str(pytester.path / "facts.jsonl"),
        "BUILD_LOG": str(pytester.path / "builds.log"),
        "EXPECTED_WORKERS": "1",
        "CORRAL_BROKER_URL": redis_url,
        "CORRAL_RUN_ID": run_id,
        "CORRAL_MACHINES": "2",
    }
    other = f"corral_{run_id}_elsewhere"
    # The two invocations run the two halves of the suite: the run check passes.
    first = start_pytest(
        pytester.path, ["-n", "0"], inner_env(CORRAL_HOST="machine-a", CORRAL_SHARD="1/2", **common)
    )
    out, _ = first.communicate(timeout=100)
    assert first.returncode == 0, out
    assert redis_keys(redis_url, run_id) != []  # one of two: the run goes on
    template = json.loads((pytester.path / "facts.jsonl").read_text().splitlines()[0])["run"][
        "template"
    ]
    # "Another machine's" clone of the same run, created by a live process (this one).
    clone_database(postgres_dsn, template, other, run_id=run_id)
    try:
        again = start_pytest(
            pytester.path,
            ["-n", "0"],
            inner_env(CORRAL_HOST="machine-a", CORRAL_SHARD="2/2", **common),
        )
        out, _ = again.communicate(timeout=100)
        assert again.returncode == 0, out
        names = [
            db.name
            for db in list_databases(postgres_dsn)
            if db.run == run_id and db.kind == "clone"
        ]
        assert names == [other]
    finally:
        drop_database(postgres_dsn, other)
        drop_database(postgres_dsn, template)
    # Two invocations counted out of two: the second deleted the run's keys.
    assert redis_keys(redis_url, run_id) == []


def test_a_crashed_worker_on_redis(
    pytester: pytest.Pytester, redis_url: str, postgres_dsn: str
) -> None:
    # Its Redis session expires (1.5 s here), its slot frees; xdist replaces it and the
    # run completes; the controller drops the dead worker's clone with its own.
    _write_suite(pytester.path)
    run_id = f"crash-{secrets.token_hex(4)}"
    env = inner_env(
        CORRAL_DSN=postgres_dsn,
        FACTS=str(pytester.path / "facts.jsonl"),
        BUILD_LOG=str(pytester.path / "builds.log"),
        CRASH_ONCE=str(pytester.path / "crashed"),
        CORRAL_SESSION_TTL="1.5",
        CORRAL_HOST="machine-a",
    )
    args = ["-n", "2", "--corral-broker", redis_url, "--corral-run-id", run_id]
    proc = start_pytest(pytester.path, [*args, "--corral-machines", "1"], env)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "7 passed" in out
    assert "1 failed" in out
    pytest.LineMatcher(out.splitlines()).fnmatch_lines(["*corral: crashed workers*"])
    facts = [json.loads(line) for line in (pytester.path / "facts.jsonl").read_text().splitlines()]
    assert {f["run"]["run_id"] for f in facts} == {run_id}
    clones = [db for db in list_databases(postgres_dsn) if db.run == run_id]
    assert [db.name for db in clones if db.kind == "clone"] == []
    assert redis_keys(redis_url, run_id) == []
    drop_database(postgres_dsn, facts[0]["run"]["template"])


def test_without_machines_the_last_controller_out_deletes_the_run(
    pytester: pytest.Pytester, redis_url: str
) -> None:
    # No --corral-machines: machine A finishes while B still tests and leaves the keys;
    # B, the last one out, deletes them (purge_if_last).
    pytester.makepyfile(
        test_meet="""
        import os
        import time
        from pathlib import Path

        def test_meet():
            Path(os.environ["STARTED"]).touch()
            deadline = time.monotonic() + 60
            while not Path(os.environ["GO"]).exists():
                assert time.monotonic() < deadline, "never told to finish"
                time.sleep(0.05)
        """
    )
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    run_id = f"last-{secrets.token_hex(4)}"
    a_started, b_started, a_done = (pytester.path / name for name in ("a", "b", "a-done"))
    args = ["-n", "0", "--corral-broker", redis_url, "--corral-run-id", run_id]
    a = start_pytest(
        pytester.path,
        args,
        inner_env(CORRAL_HOST="machine-a", STARTED=str(a_started), GO=str(b_started)),
    )
    b = start_pytest(
        pytester.path,
        args,
        inner_env(CORRAL_HOST="machine-b", STARTED=str(b_started), GO=str(a_done)),
    )
    try:
        out_a, _ = a.communicate(timeout=100)
        assert a.returncode == 0, out_a
        assert redis_keys(redis_url, run_id) != []  # B still tests: A left the run alone
        a_done.touch()
        out_b, _ = b.communicate(timeout=100)
        assert b.returncode == 0, out_b
        assert redis_keys(redis_url, run_id) == []  # the last one out deleted it
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        from corral.broker.redis import RedisClient

        with RedisClient(redis_url, run_id=run_id) as client:
            client.purge()


def test_report_lists_what_is_held_in_the_redis_run(
    pytester: pytest.Pytester, redis_url: str
) -> None:
    pytester.makepyfile(
        test_leak="""
        import pytest

        from corral import Client

        LEAKED = []

        def test_takes_and_keeps(corral):
            client = Client()
            assert type(client).__name__ == "RedisClient"
            client.lease("api-keys", "test_takes_and_keeps", ttl=600)
            held = client.lock("migrations", ttl=600)
            held.__enter__()
            LEAKED.append((client, held))  # never released: the run's end must say so


        @pytest.mark.asyncio
        async def test_async_fixture_is_a_redis_client(corral_async):
            assert type(corral_async).__name__ == "AsyncRedisClient"
            assert await corral_async.incr("async-counter") == 1
        """
    )
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    run_id = f"leak-{secrets.token_hex(4)}"
    env = inner_env(CORRAL_HOST="machine-a")
    args = ["-n", "0", "--corral-broker", redis_url, "--corral-run-id", run_id]
    proc = start_pytest(pytester.path, args, env)
    out, _ = proc.communicate(timeout=60)
    try:
        assert proc.returncode == 0, out
        assert "2 passed" in out
        lines = pytest.LineMatcher(out.splitlines())
        lines.fnmatch_lines(["*corral warning: still held in the Redis run (all machines)*"])
        # Read from Redis: a lease names its holder; a lock's holder is a process on a host.
        lines.fnmatch_lines(["lease 'api-keys' #0 held by 'test_takes_and_keeps' for * s"])
        lines.fnmatch_lines(["lock 'migrations' (1) held by 'pid * on *' for * s"])
        # The only machine, finished: nobody else to hold them for.
        lines.fnmatch_lines(["A test or fixture took these and never gave them back*"])
        assert "still running" not in out
    finally:
        from corral.broker.redis import RedisClient

        with RedisClient(redis_url, run_id=run_id) as client:
            client.purge()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--corral-broker", "{redis}"], {}, "*needs the run's name: pass --corral-run-id*"),
        ([], {"CORRAL_BROKER_URL": "{redis}"}, "*CI pipeline id*"),
        (["--corral-broker", "/tmp/x.sock"], {}, "*is not a Redis URL*"),
        (
            ["--corral-broker", "{redis}", "--corral-run-id", "a b"],
            {},
            "*a run id is 1-64 characters*",
        ),
        (["--corral-machines", "2"], {}, "*--corral-machines needs a Redis broker*"),
    ],
    ids=["option-no-run-id", "env-no-run-id", "not-redis", "bad-run-id", "machines-no-redis"],
)
def test_usage_errors(
    pytester: pytest.Pytester,
    redis_url: str,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    pytester.makepyfile("def test_never(): pass")
    full_env = inner_env(**{k: v.format(redis=redis_url) for k, v in env.items()})
    proc = start_pytest(pytester.path, [a.format(redis=redis_url) for a in args], full_env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "test_never" not in out
    pytest.LineMatcher(out.splitlines()).fnmatch_lines([message])
