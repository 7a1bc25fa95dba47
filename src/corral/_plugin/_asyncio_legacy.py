"""pytest-asyncio < 0.26 glue: open a test's async sandboxes on its event loop before its
async fixtures, from sync fixtures, in the main thread's context, which they all copy.

Those versions run each async fixture (``loop.run_until_complete``) and the test in a
task of their own (0.24-0.25 carry a fixture's context into the test only, or not at
all), and each task copies the main thread's context when it is created. A sync fixture
of ours, first among the test's function-scoped fixtures, opens the async sandboxes on
the loop they share and binds them in the main thread's context: the test's async
fixtures and the test inherit them, so their writes land in the test's sandbox. Fixture
scopes whose async fixtures write get a sandbox level the same way, on their loop. What
needs a newer version (a test whose async fixtures run on another loop than it) is left
out, with one line in the run's report.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from corral._plugin._process import STATE, sandbox_manager
from corral._versions import ASYNCIO_GLUE, installed

__all__ = ["FIXTURE", "pytest_runtest_setup"]

FIXTURE = "_corral_async_sandbox_legacy"

_Scope = Literal["function", "class", "module", "package", "session"]
_SCOPES: tuple[_Scope, ...] = ("function", "class", "module", "package", "session")
# The name of the loop fixture the test's function-level sandboxes open on.
_LOOP = pytest.StashKey[str]()


def _degraded(what: str) -> str:
    return (
        f"corral: with pytest-asyncio {installed('pytest-asyncio')}, {what}; "
        f"upgrade pytest-asyncio to >= {ASYNCIO_GLUE} for them"
    )


#: The one line each degraded feature adds to the run's report.
OTHER_LOOPS = (
    "a test whose async fixtures run on another event loop than the test (an event_loop "
    "fixture beside asyncio(scope=...) or loop_scope) gets its sandbox on its own loop: "
    "those fixtures' writes through sandboxed handles are refused, or unseen by the test"
)
NO_LOOP = (
    "async fixtures of a scope whose event loop corral cannot find get no sandbox level "
    "of their own: their writes through sandboxed handles are refused"
)


def _loop_fixture(node: pytest.Item | pytest.Collector, loop_scope: str) -> str | None:
    """The name of the fixture giving the event loop of *loop_scope* around *node*.

    0.21-0.22: ``event_loop`` for every scope (a wider one is the app's own override).
    0.23-0.25: ``event_loop`` for function scope; a loop fixture per scope node otherwise,
    its name in the node's stash under pytest-asyncio's key (those releases are final).
    """
    try:
        from pytest_asyncio.plugin import _event_loop_fixture_id  # type: ignore[attr-defined]
    except ImportError:
        return "event_loop"
    if loop_scope == "function":
        return "event_loop"
    kinds: dict[str, type[pytest.Collector]] = {
        "class": pytest.Class,
        "module": pytest.Module,
        "package": pytest.Package,
        "session": pytest.Session,
    }
    kind = kinds.get(loop_scope)
    if kind is None:
        return None
    for parent in reversed(node.listchain()):
        if isinstance(parent, kind):
            name = parent.stash.get(_event_loop_fixture_id, None)
            return name if isinstance(name, str) and name else None
    return None


@pytest.fixture(name=FIXTURE)
def _corral_async_sandbox_legacy(request: pytest.FixtureRequest) -> Iterator[None]:
    manager = sandbox_manager(request)
    if manager is None:
        yield
        return
    loop = request.getfixturevalue(request.node.stash.get(_LOOP, "event_loop"))
    with manager.opened_on(loop, request.node):
        yield


def _scope_name(scope: str, loop_scope: str) -> str:
    return f"_corral_async_{scope}_sandbox_{loop_scope}_legacy"


def _make_scope(scope: _Scope, loop_scope: _Scope) -> Any:
    @pytest.fixture(scope=scope, name=_scope_name(scope, loop_scope))
    def sandbox(request: pytest.FixtureRequest) -> Iterator[None]:
        manager = sandbox_manager(request)
        name = _loop_fixture(request.node, loop_scope)
        if manager is None or name is None or not manager.wants_scope(request):
            yield
            return
        with manager.scope_opened_on(request.getfixturevalue(name)):
            yield

    return sandbox


# An outer sandbox on the async handles for each fixture scope whose async fixtures (on
# that loop scope) write through them, as corral._plugin._asyncio has.
for _scope in _SCOPES[1:]:
    for _loop_scope in _SCOPES[_SCOPES.index(_scope) :]:
        globals()[_scope_name(_scope, _loop_scope)] = _make_scope(_scope, _loop_scope)


def _asyncio_fixtures(item: pytest.Item) -> list[tuple[str, str]]:
    """The (scope, loop scope) of each fixture of *item* that pytest-asyncio runs (it
    marks them; loop scopes from 0.24, before which a fixture's loop is its scope's)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    try:
        default = item.config.getini("asyncio_default_fixture_loop_scope") or None
    except ValueError:  # before 0.24
        default = None
    found = []
    for defs in info.name2fixturedefs.values():
        func = defs[-1].func
        original = inspect.unwrap(func)
        if not (inspect.iscoroutinefunction(original) or inspect.isasyncgenfunction(original)):
            continue
        if getattr(func, "_force_asyncio_fixture", False) or getattr(
            original, "_force_asyncio_fixture", False
        ):
            scope = defs[-1].scope
            loop_scope = getattr(original, "_loop_scope", None) or default or scope
            found.append((scope, str(loop_scope)))
    return found


def _note(item: pytest.Item, what: str) -> None:
    process = item.config.stash.get(STATE, None)
    if process is not None:
        process.degraded.add(_degraded(what))


def _covers(item: pytest.Item, scope: str) -> bool:
    """Whether the ``event_loop`` fixture *item* sees lives at least as long as *scope*."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get("event_loop") if info is not None else None
    if not defs:
        return False
    return _SCOPES.index(defs[-1].scope) >= _SCOPES.index(scope)


def _insert_scope_levels(item: pytest.Item, names: list[str], pairs: list[tuple[str, str]]) -> None:
    """Put each wider scope's sandbox fixture before the project's fixtures of that scope."""
    for scope, loop_scope in dict.fromkeys(pairs):
        if scope not in _SCOPES[1:] or loop_scope not in _SCOPES:
            continue
        if _SCOPES.index(loop_scope) < _SCOPES.index(scope):
            continue  # pytest-asyncio refuses it itself
        loop = _loop_fixture(item, loop_scope)
        if loop is None:
            _note(item, NO_LOOP)
            continue
        if loop == "event_loop" and not _covers(item, scope):
            continue  # pytest refuses the app's fixture of that scope (ScopeMismatch)
        name = _scope_name(scope, loop_scope)
        if name not in names:
            sync = f"_corral_{scope}_sandbox"  # right after the sync one
            names.insert(names.index(sync) + 1 if sync in names else 0, name)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Put the sandbox fixture first among the function-scoped fixtures of an async test,
    or of a sync test that requests async fixtures, and a scope's sandbox fixture before
    the project's async fixtures of that scope."""
    names: list[str] | None = getattr(item, "fixturenames", None)
    if names is None:
        return
    fixtures = _asyncio_fixtures(item)
    wider = [pair for pair in fixtures if pair[0] != "function"]
    _insert_scope_levels(item, names, wider)
    loops = {loop for scope, loop in fixtures if scope == "function"}
    marker = item.get_closest_marker("asyncio")
    if marker is not None and inspect.iscoroutinefunction(getattr(item, "obj", None)):
        loops.add(marker.kwargs.get("loop_scope") or marker.kwargs.get("scope") or "function")
    if not loops:
        return
    found = {_loop_fixture(item, loop) for loop in loops}
    if len(found) != 1 or None in found:
        # The test's wrapper opens its sandboxes on its own loop.
        _note(item, OTHER_LOOPS)
        return
    loop = str(found.pop())
    if any(_loop_fixture(item, loop_scope) != loop for _, loop_scope in wider):
        _note(item, OTHER_LOOPS)  # their scope's level is on another loop: not nested in
    item.stash[_LOOP] = loop
    if FIXTURE not in names:
        # Right after the sync sandbox fixture, before every other function-scoped one.
        anchor = names.index("_corral_sandbox") + 1 if "_corral_sandbox" in names else 0
        names.insert(anchor, FIXTURE)
