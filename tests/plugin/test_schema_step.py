"""The schema step: a ``module:function`` runs in a child process, and must build something.

End to end (inner pytest runs on this session's server): an app's cached settings filled
during the migration cannot keep the template's URL; the child gets the URL in every
shape; failures, hangs and Ctrl-C fail the run once and leave no database behind; a
migration that builds another database is caught.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from corral._plugin._schema import SchemaChild, _tail, child_env, module_source, set_variables
from corral.postgres import list_databases, template_name
from tests._inner import RUN_VARIABLES
from tests.plugin._checks import processes_mentioning

_LIBPQ = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An empty pytester directory whose runs start their own corral run."""
    for name in (*RUN_VARIABLES, *_LIBPQ, "APP_DATABASE_URL", "POSTGRES_DB"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def _ini(project: pytest.Pytester, schema: str, *lines: str) -> None:
    (project.path / "pytest.ini").write_text(
        "\n".join(
            [
                "[pytest]",
                f"corral_schema = {schema}",
                *lines,
                "filterwarnings = error",
                "asyncio_default_fixture_loop_scope = function",
            ]
        )
        + "\n"
    )


def _names(dsn: str) -> set[str]:
    return {db.name for db in list_databases(dsn)}


# The app's settings: read once, cached for the life of the process (pydantic-settings
# apps do the same with @lru_cache on get_settings()).
_SETTINGS = """
import functools
import os

@functools.lru_cache
def get_settings():
    return {"database_url": os.environ["DATABASE_URL"]}
"""

# The schema function an app wrote for corral: it points the app's variable at the
# template, then runs its Alembic env.py, which takes the URL from the app's settings.
_MIGRATIONS = """
import os
import psycopg
from settings import get_settings

def migrate(dsn):
    os.environ["DATABASE_URL"] = dsn
    with psycopg.connect(get_settings()["database_url"]) as conn:
        conn.execute("CREATE TABLE item (id serial PRIMARY KEY, name text NOT NULL)")
"""

_APP_TESTS = """
import psycopg
import pytest
from settings import get_settings

@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_the_app_reaches_its_own_database(name, corral_database_url):
    assert get_settings()["database_url"] == corral_database_url
    with psycopg.connect(get_settings()["database_url"]) as conn:
        conn.execute("INSERT INTO item (name) VALUES (%s)", [name])
        conn.commit()
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_cached_settings_filled_by_the_migration_do_not_keep_the_template(
    project: pytest.Pytester, shared_server: str, workers: str
) -> None:
    _ini(project, "migrations:migrate", "corral_database_env = DATABASE_URL")
    project.makepyfile(settings=_SETTINGS, migrations=_MIGRATIONS, test_app=_APP_TESTS)
    result = project.runpytest_subprocess("-n", workers, "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert "not currently accepting connections" not in result.stdout.str()


_PROBE = """
import json
import os
import sys

print("output of a schema step that succeeds")

def migrate(dsn):
    import psycopg
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE probe (id int)")
    names = ["CORRAL_DATABASE_URL", "DATABASE_URL", "CORRAL_SANDBOX_MODE",
             "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"]
    facts = {name: os.environ.get(name) for name in names}
    facts.update(dsn=dsn, pid=os.getpid(), executable=sys.executable, path=sys.path,
                 helper=__import__("helper").__file__)
    with open(os.environ["SCHEMA_FACTS"], "a") as out:
        out.write(json.dumps(facts) + "\\n")
"""


def test_the_child_gets_the_url_in_every_shape(
    project: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    facts_file = project.path / "facts.jsonl"
    monkeypatch.setenv("SCHEMA_FACTS", str(facts_file))
    _ini(
        project,
        "migrations:migrate",
        # NAME={part} entries in the child: test_child_env_sets_every_shape_and_keeps_the_rest
        # (the test processes' side of them is wired separately).
        "corral_database_env = DATABASE_URL",
    )
    project.makepyfile(
        migrations=_PROBE,
        helper="",
        test_pid="""
        import os

        def test_runs_in_another_process():
            with open(os.environ["SCHEMA_FACTS"]) as facts:
                assert str(os.getpid()) not in facts.read()
        """,
    )
    # Started from a subdirectory: the ini file's directory is importable all the same.
    (project.path / "elsewhere").mkdir()
    monkeypatch.chdir(project.path / "elsewhere")
    result = project.runpytest_subprocess("-n", "2", str(project.path))
    result.assert_outcomes(passed=1)
    assert "output of a schema step that succeeds" not in result.stdout.str() + result.stderr.str()
    lines = facts_file.read_text().splitlines()
    assert len(lines) == 1  # built once, by the controller, for both workers
    facts = json.loads(lines[0])
    template = facts["PGDATABASE"]
    assert template.startswith("corral_tpl_")
    assert facts["CORRAL_DATABASE_URL"] == facts["DATABASE_URL"] == facts["dsn"]
    assert psycopg.conninfo.conninfo_to_dict(facts["dsn"])["dbname"] == template
    params = psycopg.conninfo.conninfo_to_dict(facts["dsn"])
    assert (facts["PGHOST"], facts["PGPORT"]) == (params["host"], str(params["port"]))
    assert facts["PGUSER"] == params["user"]
    assert facts["CORRAL_SANDBOX_MODE"] == "normal"
    assert facts["executable"] == sys.executable
    assert facts["helper"] == str(project.path / "helper.py")


_FAILING = """
import sys

def migrate(dsn):
    print("applying migration 0001")
    print("to stderr", file=sys.stderr)
    helper()

def helper():
    raise RuntimeError("column 'x' does not exist")
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_failing_step_fails_the_run_once_with_its_output(
    project: pytest.Pytester, shared_server: str, workers: str
) -> None:
    _ini(project, "failing_migrations:migrate")
    project.makepyfile(failing_migrations=_FAILING, test_never="def test_x():\n    pass\n")
    before = _names(shared_server)
    result = project.runpytest_subprocess("-n", workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert errors.count("corral: the schema step failing_migrations:migrate failed") == 1
    assert "(exit status 1), so no test ran." in errors
    for line in ("applying migration 0001", "to stderr", "in helper", "RuntimeError: column"):
        assert errors.count(line) == 1, (line, errors)
    assert 'File "<string>"' not in errors  # corral's bootstrap is not the user's concern
    assert "gw0" not in result.stdout.str()
    assert _names(shared_server) == before


def test_an_import_error_or_a_missing_function_is_reported(
    project: pytest.Pytester, shared_server: str
) -> None:
    _ini(project, "broken_import:migrate")
    project.makepyfile(broken_import="import no_such_module_anywhere\n")
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*No module named 'no_such_module_anywhere'*"])
    _ini(project, "no_function:migrate")
    project.makepyfile(no_function="def other(dsn):\n    pass\n")
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*corral_schema: no_function has no function 'migrate'*"])
    _ini(project, "not_there:migrate")
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*corral_schema: cannot find module 'not_there'*"])


_HANGING = """
import os
import pathlib
import time

def migrate(dsn):
    import psycopg
    conn = psycopg.connect(dsn)  # held open: the template must still be dropped
    conn.execute("CREATE TABLE half (id int)")
    conn.commit()
    pathlib.Path(os.environ["SCHEMA_STARTED"]).write_text(str(os.getpid()))
    time.sleep(120)
"""


def _hanging_project(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *lines: str
) -> tuple[str, Path]:
    module = f"hangs_{secrets.token_hex(4)}"
    started = project.path / "started"
    monkeypatch.setenv("SCHEMA_STARTED", str(started))
    _ini(project, f"{module}:migrate", *lines)
    project.makepyfile(**{module: _HANGING, "test_never": "def test_x():\n    pass\n"})
    return module, started


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_hanging_step_is_killed_at_its_timeout(
    project: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, started = _hanging_project(project, monkeypatch, "corral_schema_timeout = 3")
    before = _names(shared_server)
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*the schema step {module}:migrate did not finish within 3 s (corral_schema_timeout)*"]
    )
    assert _gone(int(started.read_text()))
    assert _names(shared_server) == before


def test_ctrl_c_during_the_step_kills_it_and_leaves_nothing(
    project: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, started = _hanging_project(project, monkeypatch)
    before = _names(shared_server)
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0"],
        cwd=project.path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.05)
        assert started.exists(), run.communicate()[0]
        run.send_signal(signal.SIGINT)  # what the terminal does, to pytest only
        run.communicate(timeout=60)
    finally:
        run.kill()
    assert _gone(int(started.read_text()))
    assert not processes_mentioning(module)
    assert _names(shared_server) == before


# The trap of section 3: env.py reads the app's own variable, which names another
# database; the migration succeeds there and the template stays empty.
_ELSEWHERE = """
import os
import psycopg

def migrate(dsn):
    with psycopg.connect(os.environ["APP_DATABASE_URL"]) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS item (id int)")
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_migration_of_another_database_fails_the_run(
    project: pytest.Pytester,
    developer_database: str,
    shared_server: str,
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    monkeypatch.setenv("APP_DATABASE_URL", developer_database)
    _ini(project, "elsewhere:migrate", "corral_database_env = DATABASE_URL POSTGRES_DB={dbname}")
    project.makepyfile(elsewhere=_ELSEWHERE, test_never="def test_x():\n    pass\n")
    before = _names(shared_server)
    result = project.runpytest_subprocess("-n", workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    message = (
        "corral: the schema step ran but created no table in the template (does your "
        "migration environment read the URL from somewhere else?)"
    )
    assert errors.count(message) == 1, errors
    result.stderr.fnmatch_lines(
        [
            "*corral ran elsewhere:migrate with the template's URL as its argument and in "
            "CORRAL_DATABASE_URL, DATABASE_URL, POSTGRES_DB, PGHOST, PGPORT, PGUSER, "
            "PGDATABASE; the template corral_tpl_* was dropped, so no test ran.*"
        ]
    )
    assert "gw0" not in result.stdout.str()
    assert _names(shared_server) == before


def test_sql_files_that_create_nothing_fail_and_no_schema_is_fine(
    project: pytest.Pytester, shared_server: str
) -> None:
    (project.path / "schema.sql").write_text("-- nothing yet\nSELECT 1;\n")
    _ini(project, "schema.sql")
    project.makepyfile(test_one="def test_x():\n    pass\n")
    before = _names(shared_server)
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*the schema step ran but created no table*", "*corral ran *schema.sql on the template*"]
    )
    assert _names(shared_server) == before
    # No schema step at all (corral_database = on): empty clones, by request.
    (project.path / "pytest.ini").write_text("[pytest]\ncorral_database = on\n")
    project.runpytest_subprocess("-n", "0").assert_outcomes(passed=1)


def test_a_bad_timeout_is_a_usage_error(project: pytest.Pytester) -> None:
    _ini(project, "migrations:migrate", "corral_schema_timeout = soon")
    result = project.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*ini corral_schema_timeout must be a number of seconds above 0, not 'soon'*"]
    )


# ---------------------------------------------------------------------- pure parts


def test_child_env_sets_every_shape_and_keeps_the_rest() -> None:
    dsn = "postgresql://postgres:s3cret@127.0.0.1:5544/corral_tpl_abc"
    env = child_env(
        dsn, ["DATABASE_URL", "DB_HOST={host}", "DB_PORT={port}", "A={asyncpg_url}"], {"KEEP": "1"}
    )
    assert env == {
        "KEEP": "1",
        "CORRAL_DATABASE_URL": dsn,
        "CORRAL_SANDBOX_MODE": "normal",
        "DATABASE_URL": dsn,
        "DB_HOST": "127.0.0.1",
        "DB_PORT": "5544",
        "A": "postgresql+asyncpg://postgres:s3cret@127.0.0.1:5544/corral_tpl_abc",
        "PGHOST": "127.0.0.1",
        "PGPORT": "5544",
        "PGUSER": "postgres",
        "PGDATABASE": "corral_tpl_abc",
        "PGPASSWORD": "s3cret",
    }
    assert set_variables(dsn, ["DATABASE_URL", "DB_HOST={host}"]) == [
        "CORRAL_DATABASE_URL",
        "DATABASE_URL",
        "DB_HOST",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
    ]


def test_the_module_is_found_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "corral_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (package / "env.py").write_text("raise RuntimeError('imported!')\ndef upgrade(dsn): ...\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert module_source("corral_probe_pkg.env", [tmp_path]) == (package / "env.py").read_bytes()
    assert module_source("corral_probe_pkg.nothing", [tmp_path]) is None
    assert module_source("corral_probe_pkg", [tmp_path]) is not None
    assert "corral_probe_pkg" not in sys.modules


def test_the_template_is_named_as_for_the_imported_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "corral_probe_named.py").write_text("def upgrade(dsn):\n    pass\n")
    watched = tmp_path / "versions"
    watched.mkdir()
    (watched / "0001.py").write_text("x = 1\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    try:
        from corral_probe_named import upgrade  # type: ignore[import-not-found]

        child = SchemaChild("corral_probe_named:upgrade", [tmp_path])
        assert child.template_name([watched]) == template_name(upgrade, watch=[watched])
    finally:
        sys.modules.pop("corral_probe_named", None)


def test_long_output_keeps_its_end() -> None:
    text = "\n".join(f"line {i}" for i in range(200)).encode()
    tail = _tail(text).splitlines()
    assert tail[0] == "[140 earlier lines left out]"
    assert tail[-1] == "line 199"
    assert _tail(b"short\n") == "short"
