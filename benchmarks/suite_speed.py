"""Wall time of a realistic database test suite: TRUNCATE clean-up vs corral, serial and parallel.

Run: ``python -m benchmarks.suite_speed [--tests 400] [--rounds 1] [--workers 2,4]``.
Generates a suite (a blog app on a psycopg pool; each test signs two users up, publishes a
tagged post, comments and reads a feed: 15 statements) and times whole ``pytest`` runs of
it, each in a fresh process: serial with a ``TRUNCATE ... CASCADE`` of every table after
each test (what database-cleaner style suites do), serial under corral (one sandbox per
test), and corral with ``-n 2`` / ``-n 4``. The schema has the blog's 8 tables plus
``--extra-tables`` (default 24: a mid-sized app has ~30 tables, and a truncating suite
truncates all of them, not just those a test touched); ``--extra-tables 0`` measures the
blog alone. All runs use one throwaway PostgreSQL server started here (or ``--dsn``). corral runs
with its defaults; the ``colocate on`` rows (``--corral-colocate=auto``: each test process
shares a CPU with its database backends) and ``gc freeze on`` rows (``--corral-gc-freeze=on``)
show what the two opt-in speed-ups are worth. The suite loads
only the plugins it uses (xdist, corral): a development environment has more installed
(hypothesis, pytest-benchmark, pytest-asyncio...) whose hooks cost 1-2 ms per test in every
mode alike, which says nothing about clean-up strategies; ``--all-plugins`` loads them.
Targets (issue 7): serial corral >= 5x faster than serial TRUNCATE; ``-n 2`` >= 1.6x
faster than serial corral (on 2 cores, which the database shares).

Every mode is also timed on a 2-test copy of the suite: that is its fixed cost (start-up,
collection, shutdown), and the difference is its cost per test. From the two the
benchmark says from how many tests on ``-n 2`` reaches 1.6x serial corral on this machine.
The runs keep Python's bytecode cache, as on a developer's machine or a CI runner with a
cached virtualenv (``PYTHONDONTWRITEBYTECODE``, set on some machines, would recompile
every module in every process: ~70 ms per process), after one untimed warm-up run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.postgres import (
    EphemeralPostgres,
    clone_database,
    database_dsn,
    drop_database,
    ensure_template,
)

SCHEMA = """
CREATE TABLE users (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL,
    created timestamptz NOT NULL DEFAULT now());
CREATE TABLE profiles (user_id bigint PRIMARY KEY REFERENCES users ON DELETE CASCADE,
    display_name text NOT NULL, bio text NOT NULL DEFAULT '');
CREATE TABLE posts (id bigserial PRIMARY KEY, author_id bigint NOT NULL REFERENCES users,
    title text NOT NULL, body text NOT NULL, published boolean NOT NULL DEFAULT false,
    created timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON posts (author_id, created DESC);
CREATE TABLE comments (id bigserial PRIMARY KEY, post_id bigint NOT NULL REFERENCES posts,
    author_id bigint NOT NULL REFERENCES users, body text NOT NULL);
CREATE INDEX ON comments (post_id);
CREATE TABLE tags (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
CREATE TABLE post_tags (post_id bigint REFERENCES posts, tag_id int REFERENCES tags,
    PRIMARY KEY (post_id, tag_id));
CREATE TABLE likes (user_id bigint REFERENCES users, post_id bigint REFERENCES posts,
    PRIMARY KEY (user_id, post_id));
CREATE TABLE audit_log (id bigserial PRIMARY KEY, actor bigint, action text NOT NULL,
    at timestamptz NOT NULL DEFAULT now());
"""

BLOG_TABLES = ["users", "profiles", "posts", "comments", "tags", "post_tags", "likes", "audit_log"]
EXTRA_TABLE = """
CREATE TABLE extra_{n} (id bigserial PRIMARY KEY, user_id bigint REFERENCES users,
    kind text NOT NULL DEFAULT 'x', payload jsonb, created timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON extra_{n} (user_id);
"""

APP = '''
"""The application under test: a blog on a psycopg pool, URL read at import."""
import os

from psycopg_pool import ConnectionPool

from corral.sandbox import sandbox

pool = sandbox(ConnectionPool(os.environ["DATABASE_URL"], min_size=2, max_size=4, open=True))


def _audit(conn, actor, action):
    conn.execute("INSERT INTO audit_log (actor, action) VALUES (%s, %s)", [actor, action])


def sign_up(email, name):
    with pool.connection() as conn, conn.transaction():
        (uid,) = conn.execute(
            "INSERT INTO users (email) VALUES (%s) RETURNING id", [email]
        ).fetchone()
        conn.execute(
            "INSERT INTO profiles (user_id, display_name) VALUES (%s, %s)", [uid, name]
        )
        _audit(conn, uid, "sign_up")
    return uid


def publish(author, title, tags):
    with pool.connection() as conn, conn.transaction():
        (pid,) = conn.execute(
            "INSERT INTO posts (author_id, title, body, published) VALUES (%s, %s, %s, true)"
            " RETURNING id",
            [author, title, title * 3],
        ).fetchone()
        for tag in tags:
            (tid,) = conn.execute(
                "INSERT INTO tags (name) VALUES (%s) ON CONFLICT (name)"
                " DO UPDATE SET name = excluded.name RETURNING id",
                [tag],
            ).fetchone()
            conn.execute("INSERT INTO post_tags VALUES (%s, %s)", [pid, tid])
        _audit(conn, author, "publish")
    return pid


def comment(post, author, body):
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO comments (post_id, author_id, body) VALUES (%s, %s, %s)",
            [post, author, body],
        )
        conn.execute("INSERT INTO likes VALUES (%s, %s) ON CONFLICT DO NOTHING", [author, post])


def feed(user):
    with pool.connection() as conn:
        return conn.execute(
            "SELECT p.title, count(DISTINCT c.id), count(DISTINCT l.user_id),"
            " array_agg(DISTINCT t.name)"
            " FROM posts p LEFT JOIN comments c ON c.post_id = p.id"
            " LEFT JOIN likes l ON l.post_id = p.id"
            " LEFT JOIN post_tags pt ON pt.post_id = p.id LEFT JOIN tags t ON t.id = pt.tag_id"
            " WHERE p.author_id = %s GROUP BY p.id ORDER BY p.id",
            [user],
        ).fetchall()
'''

CONFTEST = """
import os

import pytest

import app


@pytest.fixture(autouse=True)
def _clean_up():
    yield
    if os.environ.get("BENCH_CLEANUP") == "truncate":
        with app.pool.connection() as conn:
            conn.execute("TRUNCATE {tables} RESTART IDENTITY CASCADE")
"""

TEST_FILE = """
import pytest

import app


@pytest.mark.parametrize("n", range({count}))
def test_blog_flow(n):
    alice = app.sign_up("alice@example.com", "Alice")
    bob = app.sign_up("bob@example.com", "Bob")
    post = app.publish(alice, "Hello", ["intro", "news"])
    app.comment(post, bob, "Welcome!")
    [(title, comments, likes, tags)] = app.feed(alice)
    assert (title, comments, likes, sorted(tags)) == ("Hello", 1, 1, ["intro", "news"])
"""


def generate(root: Path, tests: int, extra_tables: int = 24, per_file: int = 50) -> None:
    extra = [f"extra_{n}" for n in range(extra_tables)]
    schema = SCHEMA + "".join(EXTRA_TABLE.format(n=n) for n in range(extra_tables))
    (root / "schema.sql").write_text(schema)
    (root / "app.py").write_text(APP)
    (root / "conftest.py").write_text(CONFTEST.format(tables=", ".join(BLOG_TABLES + extra)))
    (root / "pytest.ini").write_text(
        "[pytest]\ncorral_schema = schema.sql\ncorral_database_env = DATABASE_URL\n"
    )
    index = 0
    while tests > 0:
        count = min(per_file, tests)
        (root / f"test_blog_{index:02d}.py").write_text(TEST_FILE.format(count=count))
        tests -= count
        index += 1


def run_pytest(
    root: Path, args: list[str], env: dict[str, str], all_plugins: bool, corral: bool = True
) -> float:
    if all_plugins:
        plugins = ["-p", "no:randomly"] + ([] if corral else ["-p", "no:corral"])
    else:
        # The suite loads what it uses and nothing else installed here (see the docstring).
        env = {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        plugins = ["-p", "xdist.plugin"] + (["-p", "corral.pytest_plugin"] if corral else [])
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugins, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"pytest {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr}"
        )
    return elapsed


FIXED_TESTS = 2
_TARGET = 1.6


def break_even(serial_fixed: float, serial_ms: float, fixed: float, ms: float) -> str:
    """From how many tests a parallel run is 1.6x faster than the serial one, by the model
    ``wall = fixed + n * per_test`` fitted to each (a sentence for the report)."""
    gain = serial_ms - _TARGET * ms
    if ms <= 0:
        return f"not measurable (parallel cost per test {ms:.2f} ms: noise exceeds it)"
    if gain <= 0:
        return (
            f"never on this machine (per test {ms:.2f} ms parallel vs {serial_ms:.2f} ms "
            f"serial: the ratio tends to {serial_ms / ms:.2f}x)"
        )
    tests = max(0.0, (_TARGET * fixed - serial_fixed) * 1000 / gain)
    return f"~{tests:,.0f} tests ({tests * serial_ms / 1000:.1f} s of serial corral)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=1, help="runs per mode (median kept)")
    parser.add_argument("--workers", default="2,4", help="comma-separated -n values")
    parser.add_argument("--extra-tables", type=int, default=24, help="tables beyond the blog's 8")
    parser.add_argument("--dsn", help="admin DSN of a server to use instead of a throwaway one")
    parser.add_argument(
        "--all-plugins",
        action="store_true",
        help="let pytest load every installed plugin (default: only xdist and corral)",
    )
    args = parser.parse_args(argv)
    if args.tests <= FIXED_TESTS:
        parser.error(f"--tests must be more than {FIXED_TESTS} (the fixed-cost suite's size)")
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    load = os.getloadavg()[0]  # a shared machine: say how busy it was

    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CORRAL_", "EPHEMERAL_", "PYTEST_"))
        and k not in ("DATABASE_URL", "PYTHONDONTWRITEBYTECODE")
    }
    server = None if args.dsn else EphemeralPostgres().start()
    admin = args.dsn or server.dsn  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory(prefix="corral-suite-") as tmp:
            root, small = Path(tmp) / "suite", Path(tmp) / "fixed"
            root.mkdir()
            small.mkdir()
            generate(root, args.tests, args.extra_tables)
            generate(small, FIXED_TESTS, args.extra_tables)
            # The TRUNCATE suite runs without corral on a database of its own.
            template = ensure_template(admin, [root / "schema.sql"])
            plain = clone_database(admin, template)
            truncate_env = {
                **base_env,
                "DATABASE_URL": database_dsn(admin, plain),
                "BENCH_CLEANUP": "truncate",
            }
            # CPU claims of its own: a corral run elsewhere on the machine must not turn
            # co-location off in some modes and not others.
            claims = Path(tmp) / "cpu-claims"
            claims.mkdir()
            corral_env = {**base_env, "CORRAL_DSN": admin, "CORRAL_CPU_CLAIMS": str(claims)}
            # The two opt-in speed-ups, each on its own (both are off by default).
            colocate, freeze = ["--corral-colocate=auto"], ["--corral-gc-freeze=on"]
            modes: list[tuple[str, list[str], dict[str, str]]] = [
                ("serial, TRUNCATE after each test", ["-n", "0"], truncate_env),
                ("serial, corral sandbox", ["-n", "0"], corral_env),
                ("serial, corral, colocate on", ["-n", "0", *colocate], corral_env),
                ("serial, corral, gc freeze on", ["-n", "0", *freeze], corral_env),
            ]
            for w in workers:
                modes += [
                    (f"corral -n {w}", ["-n", w], corral_env),
                    (f"corral -n {w}, colocate on", ["-n", w, *colocate], corral_env),
                    (f"corral -n {w}, gc freeze on", ["-n", w, *freeze], corral_env),
                ]
            samples: dict[str, list[float]] = {name: [] for name, _, _ in modes}
            fixed_samples: dict[str, list[float]] = {name: [] for name, _, _ in modes}
            try:
                # Untimed: writes the bytecode of both suites and of everything they import.
                for suite in (root, small):
                    run_pytest(suite, ["-n", "0"], corral_env, args.all_plugins)
                for _ in range(args.rounds):  # rounds interleaved: noise hits every mode
                    for name, extra, env in modes:
                        corral = env is not truncate_env  # that suite runs without corral
                        samples[name].append(run_pytest(root, extra, env, args.all_plugins, corral))
                        fixed_samples[name].append(
                            run_pytest(small, extra, env, args.all_plugins, corral)
                        )
                times = {name: statistics.median(values) for name, values in samples.items()}
                fixed = {name: statistics.median(v) for name, v in fixed_samples.items()}
            finally:
                drop_database(admin, plain)
    finally:
        if server is not None:
            server.stop()

    print(
        f"# {args.tests} tests, {8 + args.extra_tables} tables, median of {args.rounds} "
        f"run(s); plugins: {'all installed' if args.all_plugins else 'xdist + corral only'}; "
        f"{os.cpu_count()} CPUs (load average {load:.1f} before), "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    truncate = times["serial, TRUNCATE after each test"]
    serial = times["serial, corral sandbox"]
    print(
        f"{'mode':<36} {'wall s':>8} {'vs TRUNCATE':>12} {'vs serial corral':>17}"
        f" {'fixed s':>8} {'ms/test':>8}"
    )
    per_test = {n: (times[n] - fixed[n]) * 1000 / (args.tests - FIXED_TESTS) for n in times}
    for name, seconds in times.items():
        print(
            f"{name:<36} {seconds:>8.2f} {truncate / seconds:>11.2f}x {serial / seconds:>16.2f}x"
            f" {fixed[name]:>8.2f} {per_test[name]:>8.2f}"
        )
    print(
        f"(fixed s: the same modes on a {FIXED_TESTS}-test copy of the suite; ms/test: the "
        "difference, per test)"
    )
    for w in workers[:1]:
        parallel = f"corral -n {w}"
        print(
            f"-n {w} reaches 1.6x serial corral from: "
            + break_even(
                fixed["serial, corral sandbox"],
                per_test["serial, corral sandbox"],
                fixed[parallel],
                per_test[parallel],
            )
        )
    print(
        f"targets: serial corral >= 5x TRUNCATE: {truncate / serial:.2f}x; "
        + "; ".join(
            f"-n {w} >= 1.6x serial corral: {serial / times[f'corral -n {w}']:.2f}x"
            for w in workers[:1]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
