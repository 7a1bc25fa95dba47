"""The corral pytest plugin (entry point ``pytest11``): options, markers, fixtures, xdist glue.

The work lives in :mod:`corral._plugin`; this module only wires it to pytest's hooks.
See ``docs/pytest.md``.
"""

from __future__ import annotations

import atexit
import inspect
import os
import sys
from collections.abc import Generator, Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

import pytest

from corral._plugin._process import STATE, CorralProcess, sandbox_manager, worker_name
from corral._plugin._run import RunInfo
from corral._plugin._settings import add_options
from corral._plugin._warnings import WrongDatabaseWarning

if TYPE_CHECKING:
    from corral.broker import AsyncClient, Client
    from corral.broker.redis import AsyncRedisClient, RedisClient

__all__ = [
    "WrongDatabaseWarning",
    "corral",
    "corral_async",
    "corral_database_url",
    "corral_worker_id",
]

_NO_SANDBOX = (
    "no_sandbox: run this test without a sandbox, on a fresh database of its own (it may "
    "commit, VACUUM, LISTEN/NOTIFY); the database is recreated after it"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def _informational(config: pytest.Config) -> bool:
    known = getattr(config, "known_args_namespace", config.option)
    return bool(getattr(known, "help", False) or getattr(known, "version", False))


@pytest.hookimpl
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # Before conftest.py files are imported: an application module they import may read
    # CORRAL_DATABASE_URL (or DATABASE_URL) at import time.
    if _informational(early_config):
        return
    _start(early_config)


def _start(config: pytest.Config, info: RunInfo | None = None) -> None:
    # The controller checked the same installation before it started the workers
    # (~10 ms of metadata look-ups per process).
    too_old = None
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        from corral._versions import check_floors

        too_old = check_floors()
    if too_old is not None:
        raise pytest.UsageError(too_old)
    process = CorralProcess.start(config, info)
    config.stash[STATE] = process
    config.add_cleanup(process.stop)
    atexit.register(process.stop)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _NO_SANDBOX)
    _quiet_benchmark_under_xdist(config)
    if _informational(config):
        return
    if STATE not in config.stash:
        # Loaded too late for the early hook (``pytest_plugins`` in a conftest file, or
        # plugin autoload disabled): still before collection.
        text = getattr(config, "workerinput", {}).get("corral")
        _start(config, RunInfo.from_json(text) if text else None)
    process = config.stash[STATE]
    if process.settings.gc_freeze:
        config.pluginmanager.register(process.gc, "corral-gc-freeze")
    if process.is_controller:
        config.pluginmanager.register(_ControllerHooks(process), "corral-controller")
    if _has_plugin(config, "asyncio", "pytest_asyncio.plugin"):
        from corral._versions import ASYNCIO_GLUE, too_old

        if too_old("pytest-asyncio", ASYNCIO_GLUE):  # older: a glue of its own
            from corral._plugin import _asyncio_legacy as glue
        else:
            from corral._plugin import _asyncio as glue  # type: ignore[no-redef]
        config.pluginmanager.register(glue, "corral-asyncio")
    if config.pluginmanager.hasplugin("anyio"):
        from corral._plugin import _anyio

        if _anyio.supported():
            config.pluginmanager.register(_anyio, "corral-anyio")
    if _has_plugin(config, "xdist", "xdist.plugin") and not hasattr(config, "workerinput"):
        from corral._plugin._xdist import XdistHooks

        config.pluginmanager.register(XdistHooks(config), "corral-xdist")
    if _has_plugin(config, "django", "pytest_django.plugin") and _django_may_apply(config):
        from corral._plugin import _django

        # Settings are loaded by now (pytest-django's early hook); migrates before xdist starts.
        _django.configure(config, process)


def _django_may_apply(config: pytest.Config) -> bool:
    """False when Django support is on ``auto`` and pytest-django loaded no settings
    (Django not imported): the glue is then not even imported."""
    mode = str(config.getini("corral_django")).strip().lower()
    return "django" in sys.modules or mode not in ("", "auto")


def _has_plugin(config: pytest.Config, *names: str) -> bool:
    """Whether a plugin is loaded: by its entry-point name (autoload) or, under
    ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``, by the module name ``-p`` loaded it as."""
    return any(config.pluginmanager.hasplugin(name) for name in names)


def _quiet_benchmark_under_xdist(config: pytest.Config) -> None:
    """Disable pytest-benchmark under xdist ourselves, as it would, minus its warning.

    pytest-benchmark disables itself under xdist but says so with a warning at configure
    time, which ``filterwarnings = error`` turns into a crash of the whole run. An
    explicit ``--benchmark-enable`` still gets its warning.
    """
    option = config.option
    if not hasattr(option, "benchmark_disable"):
        return
    xdist = getattr(option, "dist", "no") != "no" or "PYTEST_XDIST_WORKER" in os.environ
    if xdist and not option.benchmark_enable and not option.benchmark_skip:
        option.benchmark_disable = True


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    process = session.config.stash.get(STATE, None)
    workeroutput = getattr(session.config, "workeroutput", None)
    if process is not None and workeroutput is not None:
        workeroutput["corral"] = process.stats()
        if process.tracks_tests and process.due is not None:
            workeroutput["corral_due"] = process.due


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    # After -k, -m, pytest-randomly and every other plugin: the shard (--corral-shard) is
    # cut from what they left, and what they deselected is not owed to the run.
    yield
    process = config.stash.get(STATE, None)
    if process is not None and process.info is not None:
        process.select(config, items)


class _ControllerHooks:
    """Hooks that need the config but get none from pytest."""

    def __init__(self, process: CorralProcess) -> None:
        self.process = process

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Also the reports xdist forwards from the workers: what ran on this machine.
        if self.process.tracks_tests:
            self.process.ran.add(report.nodeid)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        run = self.process.run
        if run is not None and run.census is None and self.process.settings.shard is None:
            return  # no shard's exit code, no run check: nothing to settle
        if not session.config.option.collectonly:
            from corral._plugin._report import finish_run

            finish_run(self.process, session)

    def pytest_keyboard_interrupt(self) -> None:
        # Snapshot what is held while the workers still hold it: the answer to "why did
        # my run hang" when someone presses Ctrl-C.
        from corral._plugin._report import snapshot

        self.process.held_at_interrupt = snapshot(self.process)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    process = config.stash.get(STATE, None)
    if process is None or not process.is_controller:
        return
    if not process.reports_nothing(config.getoption("verbose")):
        from corral._plugin._report import report

        report(process, terminalreporter, config)


def pytest_runtest_setup(item: pytest.Item) -> None:
    process = item.config.stash.get(STATE, None)
    if process is not None and process.database is not None:
        process.database.renew()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    process = item.config.stash.get(STATE, None)
    test = getattr(item, "obj", None)
    if process is None or process.manager is None or not inspect.iscoroutinefunction(test):
        return (yield)
    # Whatever runs the coroutine runs our wrapper: the async sandboxes open in the test's
    # own task, on its loop, in its context — unless the pytest-asyncio or anyio glue
    # opened them already, in a fixture that runs before the test's async fixtures.
    item.obj = process.manager.wrap(test, item)  # type: ignore[attr-defined]
    try:
        return (yield)
    finally:
        item.obj = test  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- fixtures


def _process(request: pytest.FixtureRequest) -> CorralProcess:
    process = request.config.stash.get(STATE, None)
    if process is None or process.info is None:
        pytest.fail("the corral plugin is not active in this run", pytrace=False)
    return process


def _scope_sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
    """An outer sandbox for one fixture scope: its fixtures' data, rolled back at its end."""
    manager = sandbox_manager(request, scope=True)
    with nullcontext() if manager is None else manager.scope():
        yield


def _scope_fixture(scope: Literal["session", "package", "module", "class"]) -> Any:
    return pytest.fixture(scope=scope, autouse=True, name=f"_corral_{scope}_sandbox")(
        _scope_sandbox
    )


_corral_session_sandbox = _scope_fixture("session")
_corral_package_sandbox = _scope_fixture("package")
_corral_module_sandbox = _scope_fixture("module")
_corral_class_sandbox = _scope_fixture("class")


@pytest.fixture(autouse=True)
def _corral_sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
    """A sandbox around every test (sync handles; async ones open inside the test)."""
    manager = sandbox_manager(request)
    with nullcontext() if manager is None else manager.around(request.node):
        yield


@pytest.fixture(scope="session")
def corral(request: pytest.FixtureRequest) -> Iterator[Client | RedisClient]:
    """A blocking client of the run's broker (one connection for the session); a
    ``RedisClient`` of the run when it coordinates through Redis."""
    with _process(request).open_client() as client:
        yield client


@pytest.fixture
def corral_async(request: pytest.FixtureRequest) -> AsyncClient | AsyncRedisClient:
    """An asyncio client of the run's broker, for async tests (closed on the test's loop)."""
    process = _process(request)
    info = process.info
    assert info is not None  # _process() fails the test otherwise
    process.require_manager()  # whose test wrapper closes the client on the test's loop
    if info.broker_url:
        from corral.broker.redis import AsyncRedisClient

        return AsyncRedisClient(info.broker_url, run_id=info.run_id, worker_id=process.identity)
    from corral.broker.client_async import AsyncClient

    return AsyncClient(info.broker_path)


@pytest.fixture(scope="session")
def corral_database_url(request: pytest.FixtureRequest) -> str:
    """This process's database URL (also ``$CORRAL_DATABASE_URL``)."""
    process = _process(request)
    if process.database is None:
        pytest.fail(
            "corral's database part is off in this run: configure corral_schema (or a "
            "server with --corral-dsn), or set corral_database = on",
            pytrace=False,
        )
    return process.database.url


@pytest.fixture(scope="session")
def corral_worker_id() -> str:
    """``gw0``, ``gw1``... under xdist; ``main`` in a run without workers (the same on
    every machine of a Redis run: ``corral_worker_id`` names a process on its machine)."""
    return worker_name()
