"""An app's suite at the plugin's floors: pytest and pytest-asyncio as old as real apps pin.

corral's own suite needs newer ones (``SUITE_FLOORS``), so each pin set here gets a venv of
its own over this interpreter's packages (corral and the drivers come from here), made
once and cached under a directory named after the pins (``CORRAL_TEST_VENVS``, else
``~/.cache/corral-test-venvs``). The inner runs check that async fixtures' and tests'
writes land in the test's (or their scope's) sandbox and are rolled back, that what an
old version cannot do is reported in one line, and that an older version is one usage
error. Only test_the_installed_versions_run_the_same_app_suite runs at the installed
versions (the lowest-versions CI run deselects the others: they are the same there).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral._versions import ASYNCIO_GLUE, FLOORS
from tests._inner import inner_env
from tests._requires import in_ci

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Read at import: pytester points HOME elsewhere during a test.
_CACHE = Path(
    os.environ.get("CORRAL_TEST_VENVS")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corral-test-venvs"
)

# Each an old pytest-asyncio with the pytest a real app pins beside it: the plugin's
# floors exactly, the last release before loop_scope (which has asyncio(scope=...)), and
# the last before the glue of corral._plugin._asyncio works whole.
FLOOR_PINS = (f"pytest=={FLOORS['pytest']}", f"pytest-asyncio=={FLOORS['pytest-asyncio']}")
PINS = {
    "floors": FLOOR_PINS,
    "asyncio-0.23": ("pytest==8.1.1", "pytest-asyncio==0.23.8"),
    # loop_scope, but a fixture's context not carried into a sync test's later fixtures
    "asyncio-0.25": ("pytest==8.2.0", "pytest-asyncio==0.25.3"),
    "too-old": (f"pytest=={FLOORS['pytest']}", "pytest-asyncio==0.20.3"),
}


def _venv(pins: tuple[str, ...]) -> Path:
    """A venv with *pins* installed over this interpreter's packages (cached)."""
    key = hashlib.sha256(repr((sys.version, sys.prefix, pins)).encode()).hexdigest()[:16]
    venv = _CACHE / f"{'-'.join(p.replace('==', '') for p in pins)}-{key}"
    python = venv / "bin" / "python"
    ready = venv / "corral-ready"
    if ready.exists():
        return python
    from filelock import FileLock

    _CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv) + ".lock"):
        if ready.exists():  # another worker made it meanwhile
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # This interpreter's packages (corral, the drivers, pytest-xdist) after the venv's
        # own: a venv's --system-site-packages would be its base interpreter's instead.
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
        (Path(site_packages) / "_corral_parent.pth").write_text(
            "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n"
        )
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            message = (
                f"could not pip install {' '.join(pins)} (is the package index reachable?): "
                + pip.stderr.strip()[-2000:]
            )
            if in_ci():
                pytest.fail(message + "; CI must reach it", pytrace=False)
            pytest.skip(message)
        ready.write_text(" ".join(pins))
    return python


SCHEMA = """
CREATE TABLE item (id serial PRIMARY KEY, name text UNIQUE NOT NULL);
INSERT INTO item (name) VALUES ('seed');
"""

APP = '''
"""The app: an async and a sync psycopg connection factory, both sandboxed."""

import os

import psycopg

from corral.sandbox import sandbox

URL = os.environ["CORRAL_DATABASE_URL"]


async def _aconnect():
    return await psycopg.AsyncConnection.connect(URL)


adb = sandbox(_aconnect)
db = sandbox(lambda: psycopg.connect(URL))


async def add(name):
    async with await adb.connect() as conn:
        await conn.execute("INSERT INTO item (name) VALUES (%s)", [name])
        await conn.commit()


async def names():
    async with await adb.connect() as conn:
        cur = await conn.execute("SELECT name FROM item ORDER BY id")
        return [r[0] for r in await cur.fetchall()]


def sync_add(name):
    with db.connect() as conn:
        conn.execute("INSERT INTO item (name) VALUES (%s)", [name])
        conn.commit()


def sync_names():
    with db.connect() as conn:
        return [r[0] for r in conn.execute("SELECT name FROM item ORDER BY id")]
'''

# Every test starts from the seed row only: a row that a fixture or an earlier test left
# behind fails the next one (each worker runs several).
TESTS = """
import asyncio

import pytest
import pytest_asyncio

from app import add, names, sync_add, sync_names


@pytest_asyncio.fixture
async def row():
    assert await names() == ["seed"]
    await add("fixture")
    yield "fixture"
    assert "fixture" in await names()  # its teardown still in the test's sandbox


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(4))
async def test_async(row, n):
    assert await names() == ["seed", "fixture"]
    await add(f"test-{n}")
    assert await names() == ["seed", "fixture", f"test-{n}"]


@pytest.mark.parametrize("n", range(2))
def test_sync(n):
    assert sync_names() == ["seed"]
    sync_add(f"sync-{n}")
    assert sync_names() == ["seed", f"sync-{n}"]


@pytest.mark.parametrize("n", range(2))
def test_sync_with_an_async_fixture(row, n):
    assert sync_names() == ["seed"]


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(4))
async def test_nothing_left(n):
    assert await names() == ["seed"]
    await asyncio.sleep(0)
"""

# An async fixture of module scope that writes: its rows are seen by the module's tests,
# each of which rolls back to them; they are gone after the module. 0.21 shares a loop
# through an event_loop fixture of a wider scope; 0.23 has asyncio(scope=...) instead.
SCOPED = """
import asyncio

import pytest
import pytest_asyncio

from app import add, names

{loop}

@pytest_asyncio.fixture(scope="module"{loop_scope})
async def module_row():
    await add("module")
    yield "module"


{mark}
@pytest.mark.parametrize("n", range(2))
async def test_on_the_module_loop(module_row, n):
    assert await names() == ["seed", "module"]
    await add(f"m-{{n}}")
    assert await names() == ["seed", "module", f"m-{{n}}"]
"""

EVENT_LOOP = """
@pytest.fixture(scope="module")
def event_loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
"""

# 0.21's layout under 0.23: the module fixture runs on 0.23's module loop, the test on the
# app's event_loop: corral reports it in one line (the fixture only reads here).
OTHER_LOOP = """
import asyncio

import pytest
import pytest_asyncio

from app import names


@pytest.fixture(scope="module")
def event_loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest_asyncio.fixture(scope="module")
async def settings():
    await asyncio.sleep(0)
    return {"name": "module"}


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(2))
async def test_on_another_loop_than_its_fixture(settings, n):
    assert await names() == ["seed"]
"""

OTHER_LOOPS = (
    "corral: with pytest-asyncio {version}, a test whose async fixtures run on another "
    "event loop than the test (an event_loop fixture beside asyncio(scope=...) or "
    "loop_scope) gets its sandbox on its own loop: those fixtures' writes through "
    "sandboxed handles are refused, or unseen by the test; upgrade pytest-asyncio to >= "
    f"{ASYNCIO_GLUE} for them"
)


def _auto(source: str) -> str:
    """The suite as an auto-mode app writes it: no marks, plain fixtures."""
    lines = [line for line in source.splitlines() if line != "@pytest.mark.asyncio"]
    return "\n".join(lines).replace("@pytest_asyncio.fixture", "@pytest.fixture") + "\n"


def _app(path: Path, mode: str, scoped: str | None = None) -> None:
    """The app and its suite; *scoped*: how its module-scoped test shares a loop
    (``event_loop`` fixture, ``mark``: asyncio(scope=...), ``loop_scope``, ``other``:
    OTHER_LOOP)."""
    (path / "schema.sql").write_text(SCHEMA)
    (path / "app.py").write_text(APP)
    write = _auto if mode == "auto" else str
    (path / "test_app.py").write_text(write(TESTS))
    if scoped == "event_loop":
        source = SCOPED.format(loop=EVENT_LOOP, mark="@pytest.mark.asyncio", loop_scope="")
        (path / "test_scoped.py").write_text(write(source))
    elif scoped == "mark":
        mark = '@pytest.mark.asyncio(scope="module")'
        source = SCOPED.format(loop="", mark=mark, loop_scope="")
        (path / "test_scoped.py").write_text(write(source))
    elif scoped == "loop_scope":
        mark = '@pytest.mark.asyncio(loop_scope="module")'
        source = SCOPED.format(loop="", mark=mark, loop_scope=', loop_scope="module"')
        (path / "test_scoped.py").write_text(write(source))
    elif scoped == "other":
        (path / "test_scoped.py").write_text(write(OTHER_LOOP))
    (path / "pytest.ini").write_text(
        textwrap.dedent(
            f"""\
            [pytest]
            corral_schema = schema.sql
            asyncio_mode = {mode}
            """
        )
    )


def _run(python: Path, cwd: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=inner_env(CORRAL_DSN=dsn, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _version(python: Path, name: str) -> str:
    return subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.parametrize(
    ("pins", "mode", "workers"),
    [
        ("floors", "strict", "0"),
        ("floors", "auto", "2"),
        # strict mode and -n 2 at 0.23: test_old_versions_say_what_they_cannot_do_in_one_line
        ("asyncio-0.23", "auto", "0"),
        ("asyncio-0.25", "strict", "0"),
    ],
)
def test_old_versions_run_an_async_app_suite(
    pins: str, mode: str, workers: str, tmp_path: Path, postgres_dsn: str
) -> None:
    python = _venv(PINS[pins])
    layout = {"floors": "event_loop", "asyncio-0.23": "mark", "asyncio-0.25": "loop_scope"}
    _app(tmp_path, mode, scoped=layout[pins])
    result = _run(python, tmp_path, postgres_dsn, "-n", workers, "-q")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "14 passed" in output, output
    assert "Traceback" not in output, output
    assert "INTERNALERROR" not in output, output
    assert not [line for line in output.splitlines() if line.startswith("corral:")], output


def test_the_installed_versions_run_the_same_app_suite(tmp_path: Path, postgres_dsn: str) -> None:
    # Here, not in a venv: the lowest-versions run checks the suite's floors with it (a
    # sync test's async fixtures were not sandboxed at pytest-asyncio 0.26).
    _app(tmp_path, "strict", scoped="loop_scope")
    result = _run(Path(sys.executable), tmp_path, postgres_dsn, "-n", "2", "-q")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "14 passed" in output, output
    assert not [line for line in output.splitlines() if line.startswith("corral:")], output


def test_old_versions_say_what_they_cannot_do_in_one_line(
    tmp_path: Path, postgres_dsn: str
) -> None:
    python = _venv(PINS["asyncio-0.23"])
    _app(tmp_path, "strict", scoped="other")
    result = _run(python, tmp_path, postgres_dsn, "-n", "2", "-q")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "14 passed" in output, output
    expected = OTHER_LOOPS.format(version=_version(python, "pytest-asyncio"))
    # Once for the run, however many workers met it.
    assert [line for line in output.splitlines() if line.startswith("corral:")] == [expected]


def test_old_versions_below_the_floor_are_one_usage_error(
    tmp_path: Path, postgres_dsn: str
) -> None:
    python = _venv(PINS["too-old"])
    _app(tmp_path, "strict")
    result = _run(python, tmp_path, postgres_dsn, "-n", "0", "-q")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    floor = FLOORS["pytest-asyncio"]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"ERROR: corral: pytest-asyncio 0.20.3 is too old (corral needs >= {floor})"
    ]
    assert "Traceback" not in result.stdout
