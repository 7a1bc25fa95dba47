"""Configuration: schema callables, extra URL variables, the database part off, nested runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from corral._plugin._process import _inherited_run
from corral._plugin._run import RunInfo
from corral.pytest_plugin import _quiet_benchmark_under_xdist


def test_schema_callable_and_database_env(inner: pytest.Pytester, shared_server: str) -> None:
    (inner.path / "pytest.ini").write_text(
        "[pytest]\n"
        "corral_schema = migrations:migrate\n"
        "corral_schema_watch = schema.sql\n"
        "corral_database_env = DATABASE_URL APP_DB\n"
    )
    inner.makepyfile(
        migrations="""
        import pathlib
        import psycopg

        def migrate(dsn):
            with psycopg.connect(dsn) as conn:
                conn.execute(pathlib.Path(__file__).with_name("schema.sql").read_text())
        """,
        test_callable="""
        import os
        import app

        def test_schema_from_the_function(corral_database_url):
            assert os.environ["APP_DB"] == os.environ["DATABASE_URL"] == corral_database_url
            app.add_item("widget")
            assert app.names() == ["seed", "widget"]
        """,
    )
    result = inner.runpytest_subprocess("-n", "0", "test_callable.py")
    result.assert_outcomes(passed=1)


# What a run without a database must not import (issue 18): the database, sandbox and
# co-location parts, the Redis backend, the drivers; in a worker, the broker's server.
HEAVY = (
    "corral._plugin._colocate",
    "corral._plugin._cpuclaim",
    "corral._plugin._database",
    "corral._plugin._django",
    "corral._plugin._django_cache",
    "corral._plugin._sandbox",
    "corral.broker.redis",
    "corral.broker.server",
    "corral.postgres",
    "corral.sandbox",
    "asyncpg",
    "django",
    "psycopg",
    "redis",
    "sqlalchemy",
)


# All of corral that importing the plugin may compile: every pytest run of a venv with
# corral installed pays for these, without a bytecode cache in every process (issue 18:
# <= 50 ms in a run without a database, benchmarks/plugin_overhead.py). A module more
# here is a cost for every run: import it where the run uses it instead.
PLUGIN_IMPORTS = {
    "corral",
    "corral._lazy",
    "corral._plugin",
    "corral._plugin._envnames",
    "corral._plugin._gc",
    "corral._plugin._process",
    "corral._plugin._run",
    "corral._plugin._settings",
    "corral._plugin._warnings",
    "corral.pytest_plugin",
}
# What a run without a database adds to them: the glue of the plugins it finds installed
# (the version table picks pytest-asyncio's), and in the controller the broker's socket,
# bound for whoever connects (its server starts then), and the floors check.
NO_DATABASE_RUN_IMPORTS = PLUGIN_IMPORTS | {
    "corral._plugin._anyio",
    "corral._plugin._asyncio",
    "corral._plugin._xdist",
    "corral._versions",
}
NO_DATABASE_CONTROLLER_IMPORTS = NO_DATABASE_RUN_IMPORTS | {
    "corral._plugin._lazybroker",
    "corral.broker",
    "corral.broker._socketfile",
}


def _corral_modules(loaded: set[str]) -> set[str]:
    return {name for name in loaded if name == "corral" or name.startswith("corral.")}


def test_plugin_import_pulls_in_nothing_heavy() -> None:
    code = "import corral.pytest_plugin, sys; print(' '.join(sorted(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    loaded = set(done.stdout.split())
    assert "corral.pytest_plugin" in loaded
    assert not loaded & set(HEAVY)
    assert _corral_modules(loaded) <= PLUGIN_IMPORTS
    # secrets pulls in hashlib and hmac (and OpenSSL): os.urandom makes the run's names.
    assert "secrets" not in loaded


def test_a_run_without_a_database_imports_only_the_plugins_core(inner: pytest.Pytester) -> None:
    for name in ("conftest.py", "pytest.ini"):
        (inner.path / name).unlink()
    inner.makeconftest(
        """
        import os, sys

        def pytest_unconfigure(config):
            if not os.environ.get("PYTEST_XDIST_WORKER"):
                print("controller:", *sorted(m for m in sys.modules if m.startswith("corral")))
        """
    )
    inner.makepyfile(
        test_light=f"""
        import os, sys
        import pytest

        @pytest.mark.parametrize("n", range(2))
        def test_worker_imports_the_core_only(n):
            assert os.environ["PYTEST_XDIST_WORKER"]
            corral = {{m for m in sys.modules if m == "corral" or m.startswith("corral.")}}
            assert corral <= set({sorted(NO_DATABASE_RUN_IMPORTS)!r}), corral
        """
    )
    result = inner.runpytest_subprocess("-n", "2", "-p", "no:randomly", "-s", "test_light.py")
    result.assert_outcomes(passed=2)
    line = next(line for line in result.outlines if line.startswith("controller:"))
    controller = set(line.split()[1:])
    assert "corral.pytest_plugin" in controller
    assert controller <= NO_DATABASE_CONTROLLER_IMPORTS, controller - NO_DATABASE_CONTROLLER_IMPORTS


def test_broker_only_when_no_database_is_configured(inner: pytest.Pytester) -> None:
    for name in ("conftest.py", "pytest.ini"):
        (inner.path / name).unlink()
    inner.makepyfile(
        test_broker_only=f"""
        import os, sys
        import pytest

        def test_broker_works(corral, corral_worker_id):
            assert corral.lease("slots", corral_worker_id, ttl=60) in (0, 1)
            assert "CORRAL_DATABASE_URL" not in os.environ

        @pytest.mark.parametrize("n", range(2))
        def test_worker_imports_nothing_heavy(n):
            assert os.environ["PYTEST_XDIST_WORKER"]
            assert not set(sys.modules) & set({HEAVY!r})

        def test_database_fixture_explains(corral_database_url):
            pass
        """
    )
    result = inner.runpytest_subprocess("-n", "2", "-p", "no:randomly", "test_broker_only.py")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*corral's database part is off in this run*"])


def test_a_nested_run_is_not_mistaken_for_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    info = RunInfo(run_id="r1", controller_pid=os.getppid(), broker_path="/nowhere")
    monkeypatch.setenv("CORRAL_PLUGIN_RUN", info.to_json())
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    assert _inherited_run() == info
    other = RunInfo(run_id="r1", controller_pid=os.getppid() + 100_000, broker_path="/x")
    monkeypatch.setenv("CORRAL_PLUGIN_RUN", other.to_json())
    assert _inherited_run() is None  # inherited from a grandparent: start a run of its own
    monkeypatch.setenv("CORRAL_PLUGIN_RUN", json.dumps({"garbage": 1}))
    assert _inherited_run() is None
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    monkeypatch.setenv("CORRAL_PLUGIN_RUN", info.to_json())
    assert _inherited_run() is None


@pytest.mark.parametrize(
    ("dist", "enable", "skip", "disabled"),
    [("load", False, False, True), ("no", False, False, False), ("load", True, False, False)],
)
def test_benchmark_plugin_quietly_disabled_under_xdist(
    monkeypatch: pytest.MonkeyPatch, dist: str, enable: bool, skip: bool, disabled: bool
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    option = SimpleNamespace(
        dist=dist, benchmark_disable=False, benchmark_enable=enable, benchmark_skip=skip
    )
    _quiet_benchmark_under_xdist(SimpleNamespace(option=option))  # type: ignore[arg-type]
    assert option.benchmark_disable is disabled


def test_plugin_options_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "*corral*",
            "*--corral-dsn=DSN*",
            "*--corral-database=*",
            "*corral_schema (linelist)*",
            "*corral_database_env (args)*",
        ]
    )


def test_database_on_without_schema_gives_empty_databases(
    inner: pytest.Pytester, postgres_dsn: str
) -> None:
    for name in ("conftest.py", "pytest.ini"):
        (inner.path / name).unlink()
    (inner.path / "pytest.ini").write_text("[pytest]\ncorral_database = on\n")
    inner.makepyfile(
        test_empty="""
        import psycopg

        def test_empty(corral_database_url):
            with psycopg.connect(corral_database_url) as conn:
                sql = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                assert conn.execute(sql).fetchone() == (0,)
        """
    )
    result = inner.runpytest_subprocess("-n", "0", "--corral-dsn", postgres_dsn, "test_empty.py")
    result.assert_outcomes(passed=1)


def test_unreachable_server_is_a_usage_error_without_the_password(inner: pytest.Pytester) -> None:
    dsn = "postgresql://postgres:hunter2@127.0.0.1:1/postgres?connect_timeout=2"
    result = inner.runpytest_subprocess("-n", "0", "--corral-dsn", dsn)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert "cannot connect to the database server" in errors
    assert "hunter2" not in errors + result.stdout.str()


def test_reuses_the_broker_of_corral_run(inner: pytest.Pytester, tmp_path: Path) -> None:
    for name in ("conftest.py", "pytest.ini"):
        (inner.path / name).unlink()
    inner.makepyfile(
        test_reuse=f"""
        import os, pathlib
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_same_broker(corral, corral_worker_id, n):
            out = pathlib.Path({str(tmp_path)!r}) / corral_worker_id
            out.write_text(os.environ["EPHEMERAL_PIPE"])
            corral.set(f"seen-{{n}}", corral_worker_id, ttl=60)
        """
    )
    corral_cli = "from corral.cli import main; raise SystemExit(main())"
    result = inner.run(
        sys.executable, "-c", corral_cli, "run", "--",
        sys.executable, "-m", "pytest", "-n", "0", "-v", "test_reuse.py",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    assert "broker start" not in result.stdout.str()  # the plugin started none
    pipes = {p.read_text() for p in tmp_path.iterdir()}
    assert len(pipes) == 1
    assert not os.path.exists(pipes.pop())  # corral run stopped its broker
