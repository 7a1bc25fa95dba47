"""Django with pytest-django: the run migrates once (into a template), every test process
clones it, and a second run with unchanged migrations does not migrate at all.

The project and its pytest-django suite are generated (``_django_project.py``); each test
runs it with real PostgreSQL: corral's throwaway server (the settings name a port where
nothing listens), a server given with ``--corral-dsn``, and the settings' own server.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from corral._plugin._django_cache import dump_project
from corral.postgres import EphemeralPostgres, default_cache_dir, drop_database
from tests._inner import RUN_VARIABLES
from tests.plugin._checks import interrupt_pytest
from tests.plugin._django_project import (
    TESTS,
    break_migration,
    change_migration,
    migrate_count,
    write_project,
)

pytest.importorskip("pytest_django")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# pytester-style runs point HOME elsewhere: keep corral's real caches (initdb, templates).
_CACHE_DIR = str(default_cache_dir())
_SETTINGS_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"


def _databases(dsn: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'corral%'")
        return {name for (name,) in rows.fetchall()}


def _clones(dsn: str) -> set[str]:
    return {name for name in _databases(dsn) if "_dj" in name and not name.startswith("corral_tpl")}


def _mark_half_built(dsn: str, name: str) -> None:
    """Make *name* look like a build whose process was killed (what ensure_template marks)."""
    from corral.postgres._admin import admin
    from corral.postgres._databases import make_mark, set_mark

    with admin(dsn) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false ALLOW_CONNECTIONS true')
        set_mark(conn, name, make_mark("template", state="building", source="killed"))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A fresh project whose templates are its own (a token in one of its migrations)."""
    root = tmp_path / "project"
    write_project(root, token=secrets.token_hex(6))
    yield root
    # Its own dumps and kept servers only: other runs (in parallel) keep theirs.
    for path in _dump_dir().glob(f"{dump_project(root, ['default'])}-*"):
        path.unlink(missing_ok=True)
    for path in _snapshots(root):
        shutil.rmtree(path, ignore_errors=True)


def _dump_dir() -> Path:
    return Path(_CACHE_DIR).parent / "django"


@pytest.fixture
def server_templates(postgres_dsn: str) -> Iterator[str]:
    """``postgres_dsn``, with the templates a test makes on it dropped afterwards."""
    before = _databases(postgres_dsn)
    yield postgres_dsn
    for name in _databases(postgres_dsn) - before:
        drop_database(postgres_dsn, name)


def run(
    root: Path, *args: str, port: str = "1", expect: int = 0, test: dict[str, str] | None = None
) -> str:
    """Run the project's suite; ``port`` is where its settings look for PostgreSQL, ``test``
    its default database's ``TEST`` settings."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES and not k.startswith("PG")}
    env["DJ_PORT"] = port
    env.update({f"DJ_{key}": value for key, value in (test or {}).items()})
    env["CORRAL_PG_CACHE_DIR"] = os.environ.get("CORRAL_PG_CACHE_DIR", _CACHE_DIR)
    command = [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "-v", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-8000:]
    return output


def _snapshots(root: Path) -> list[Path]:
    """The data directories kept of the project's throwaway servers."""
    return list(_dump_dir().glob(f"{dump_project(root, ['default', 'replica'])}-*.pgdata"))


def _snapshot_databases(path: Path) -> set[str]:
    """corral's databases in a kept data directory (started on a copy of it)."""
    with EphemeralPostgres(seed=path) as server:
        return _databases(server.dsn)


def test_throwaway_server_migrates_once_per_run_then_never(project: Path) -> None:
    output = run(project, "-n", "2")
    assert f"{TESTS} passed" in output
    assert "using corral's throwaway PostgreSQL" in output
    assert "built by migrating" in output
    assert migrate_count(project) == 1  # once for the run, not once per worker
    # The server's data directory is kept, with the template and without the run's clones.
    [kept] = _snapshots(project)
    template = re.search(r"Django template (corral_tpl_\w+) built", output)
    assert template is not None, output
    assert _snapshot_databases(kept) == {template.group(1)}
    # Second run: the server starts from it, template inside (no restore, no migrating).
    output = run(project, "-n", "0")
    assert f"{TESTS} passed" in output
    assert f"throwaway PostgreSQL started from {kept}" in output
    assert "reused (no migrating)" in output
    assert migrate_count(project) == 1
    assert _snapshots(project) == [kept]
    # A damaged one is not used: the run migrates and keeps a good one in its place.
    (kept / "global" / "pg_control").unlink()
    output = run(project, "-n", "0", "-k", "isolated")
    assert "the kept Django server" in output
    assert "is unusable, migrating" in output
    assert migrate_count(project) == 2
    assert _snapshots(project) == [kept]
    assert (kept / "global" / "pg_control").is_file()
    # A half-written one (a writer that died) is never taken for one.
    partial = kept.with_name(f"{kept.name}.tmp-999999999")
    kept.rename(partial)
    output = run(project, "-n", "0", "-k", "isolated")
    assert "started from" not in output
    assert migrate_count(project) == 3
    assert not partial.exists()  # pruned: its writer is gone
    # One migration changes: another template, hence another kept server.
    change_migration(project)
    output = run(project, "-n", "0", "-k", "isolated")
    assert "started from" not in output
    assert migrate_count(project) == 4
    assert len(_snapshots(project)) == 2


def test_corral_dsn_reuses_the_template_and_leaves_no_clone(
    project: Path, server_templates: str
) -> None:
    dsn = server_templates
    before = _databases(dsn)
    output = run(project, "-n", "0", f"--corral-dsn={dsn}")
    assert f"{TESTS} passed" in output
    assert migrate_count(project) == 1
    assert "on the --corral-dsn server" in output
    # Django's template only: no (empty) template of corral's own for unused clones.
    built = set(re.findall(r"Django template (corral_tpl_\w+) built", output))
    assert len(built) == 1, output
    assert _databases(dsn) - before == built
    output = run(project, "-n", "4", f"--corral-dsn={dsn}")
    assert f"{TESTS} passed" in output
    assert "reused (no migrating)" in output
    assert migrate_count(project) == 1
    # The controller cloned the workers' databases while they booted; each worker took
    # the one made for it (a worker that came first made its own).
    precloned = re.search(r"django pre-clone \((\d) made, (\d) taken\)", output)
    assert precloned is not None, output
    assert precloned.group(1) == precloned.group(2) != "0", output
    assert _clones(dsn) == set()
    # One migration changes: a new template, built once more.
    change_migration(project)
    output = run(project, "-n", "0", f"--corral-dsn={dsn}", "-k", "isolated")
    assert migrate_count(project) == 2
    # A template left half-built by a killed run is rebuilt, never used.
    template = re.search(r"Django template (corral_tpl_\w+) built", output)
    assert template is not None, output
    _mark_half_built(dsn, template.group(1))
    run(project, "-n", "0", f"--corral-dsn={dsn}", "-k", "isolated")
    assert migrate_count(project) == 3
    # --create-db rebuilds it although nothing changed.
    run(project, "-n", "0", "--create-db", f"--corral-dsn={dsn}", "-k", "isolated")
    assert migrate_count(project) == 4
    # TEST's CHARSET and TEMPLATE make another template, created as Django would.
    charset = {"CHARSET": "SQL_ASCII", "TEMPLATE": "template0"}
    output = run(project, "-n", "0", f"--corral-dsn={dsn}", "-k", "encoding", test=charset)
    assert "1 passed" in output
    assert migrate_count(project) == 5
    assert _clones(dsn) == set()


def test_the_settings_own_server_is_used_when_it_answers(project: Path) -> None:
    try:
        before = _databases(_SETTINGS_SERVER)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 with trust auth: {exc}")
    try:
        output = run(project, "-n", "2", "-k", "clone or mirror or live", port="5432")
        assert "3 passed" in output
        assert "Django database 'default': the server at 127.0.0.1:5432" in output
        assert migrate_count(project) == 1
        assert _clones(_SETTINGS_SERVER) == set()
    finally:
        for name in _databases(_SETTINGS_SERVER) - before:
            drop_database(_SETTINGS_SERVER, name)


def test_no_server_and_no_postgresql_to_start_says_what_to_do(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The settings' server does not answer (port 1) and no PostgreSQL can be started: the
    # error is the one the non-Django run gives (docs/troubleshooting.md), with the cause.
    monkeypatch.setenv("CORRAL_PG_BINDIR", str(project / "no-postgres-here"))
    output = run(project, expect=4)
    assert (
        "corral: cannot start a throwaway PostgreSQL (no database server answers at "
        "Django's settings): "
    ) in output
    assert "CORRAL_PG_BINDIR" in output
    assert "Point corral at a server instead: --corral-dsn / corral_dsn / CORRAL_DSN" in output


def test_a_failing_migration_fails_the_run_once_before_any_test(
    project: Path, server_templates: str
) -> None:
    # TEST settings Django's PostgreSQL backend refuses are refused with its error.
    output = run(project, f"--corral-dsn={server_templates}", test={"COLLATION": "C"}, expect=4)
    assert "does not support collation" in output
    assert "TEST['COLLATION']" in output
    assert migrate_count(project) == 0
    name = break_migration(project)
    output = run(project, "-n", "2", f"--corral-dsn={server_templates}", expect=4)
    assert f"Django's migrations failed in migration {name}" in output
    assert "no_such_table" in output
    # The build ran while the workers booted: they are stopped, no test ran, and the
    # error is reported once (not by the pre-cloner nor again at the end of the run).
    assert "templates prepared while the workers start" in output
    assert "no tests ran" in output
    assert "PASSED" not in output
    assert output.count("Django's migrations failed") == 1
    assert _clones(server_templates) == set()  # the pre-cloner made nothing
    template = re.search(r"template (corral_tpl_\w+)", output)
    assert template is not None, output
    assert template.group(1) not in _databases(server_templates)  # the half-built one is gone


def test_under_xdist_the_build_overlaps_the_workers_start(
    project: Path, server_templates: str
) -> None:
    output = run(project, "-n", "2", f"--corral-dsn={server_templates}")
    assert f"{TESTS} passed" in output
    assert "templates prepared while the workers start" in output
    assert "built by migrating" in output  # said after the header: the build ended later
    assert "django build (wait)" in output
    assert migrate_count(project) == 1  # in the build's thread, once
    assert "django pre-clone (2 made, 2 taken)" in output  # made once the build had ended
    assert _clones(server_templates) == set()
    output = run(project, "-n", "2", f"--corral-dsn={server_templates}", "-k", "clone")
    assert "reused (no migrating)" in output
    assert migrate_count(project) == 1
    assert _clones(server_templates) == set()


def test_ctrl_c_during_the_build_under_xdist_ends_the_run_and_cancels_it(
    project: Path, server_templates: str
) -> None:
    # A migration after the counting one sleeps far longer than the run may take to end:
    # Ctrl-C interrupts the controller's wait, and the build's statement is cancelled.
    last = next((project / "shop" / "migrations").glob("*_token.py"))
    text = last.read_text()
    last.write_text(text.replace('RunSQL("SELECT ', 'RunSQL("SELECT pg_sleep(300), '))
    args = ["-p", "no:randomly", "-n", "2", f"--corral-dsn={server_templates}"]
    env = {k: v for k, v in os.environ.items() if k not in RUN_VARIABLES and not k.startswith("PG")}
    env.update(DJ_PORT="1", CORRAL_PG_CACHE_DIR=os.environ.get("CORRAL_PG_CACHE_DIR", _CACHE_DIR))
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k not in env]:
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        code, output = interrupt_pytest(
            project, args, ready=project / "migrate_count.txt", settle=0.5
        )
    assert code == 2, output  # interrupted, within the helper's 60 s: not after the sleep
    assert "PASSED" not in output
    assert _clones(server_templates) == set()
    with psycopg.connect(server_templates, autocommit=True) as conn:
        busy = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(300)%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    assert busy == (0,)  # cancelled, not left sleeping on the server
    last.write_text(text)
    output = run(project, "-n", "2", f"--corral-dsn={server_templates}", "-k", "clone")
    assert "built by migrating" in output  # the half-built template was never used
    assert migrate_count(project) == 2


def test_a_redis_run_clones_in_the_workers_after_the_build(
    project: Path, server_templates: str, redis_url: str
) -> None:
    # No pre-cloner (a Redis run's workers may be on other machines): each worker clones
    # in its django_db_setup, at its first database test, after the build was joined.
    run_id = f"dj-{secrets.token_hex(4)}"
    broker = ("--corral-broker", redis_url, "--corral-run-id", run_id)
    output = run(project, "-n", "2", *broker, f"--corral-dsn={server_templates}")
    assert f"{TESTS} passed" in output
    assert "templates prepared while the workers start" in output
    assert "django pre-clone" not in output
    assert migrate_count(project) == 1
    assert _clones(server_templates) == set()


def test_no_migrations_builds_from_the_models(project: Path, server_templates: str) -> None:
    output = run(
        project,
        "--no-migrations",
        f"--corral-dsn={server_templates}",
        "-k",
        "isolated or on_a_clone",
    )
    assert "3 passed" in output
    assert migrate_count(project) == 0


def test_a_project_on_sqlite_gets_the_broker_only(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nDJANGO_SETTINGS_MODULE = lite_settings\n")
    (tmp_path / "lite_settings.py").write_text(
        "SECRET_KEY = 'x'\nUSE_TZ = True\n"
        "INSTALLED_APPS = ['django.contrib.contenttypes', 'django.contrib.auth']\n"
        "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}\n"
    )
    (tmp_path / "test_lite.py").write_text(
        "from django.contrib.auth.models import User\n\n\n"
        "def test_user(db):\n    User.objects.create(username='a')\n"
        "    assert User.objects.count() == 1\n\n\n"
        "def test_broker(corral):\n    corral.set('k', 1)\n    assert corral.get('k') == 1\n"
    )
    output = run(tmp_path)
    assert "2 passed" in output
    assert "Django support off: no database uses PostgreSQL" in output
