"""pytest-asyncio glue: open async sandboxes before the test's async fixtures, on its loop.

Registered only when pytest-asyncio is active. For each async test, one async fixture
with the test's own ``loop_scope`` is put first in its fixture list: it runs in a task on
the test's loop, and pytest-asyncio carries the context it set (the sandbox routing) into
the later fixtures and the test. Without it, the test wrapper opens them instead.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import pytest_asyncio

from corral._plugin._process import sandbox_manager

__all__ = ["pytest_runtest_setup"]

_Scope = Literal["function", "class", "module", "package", "session"]
_SCOPES: tuple[_Scope, ...] = ("function", "class", "module", "package", "session")


def _fixture_name(loop_scope: str) -> str:
    return f"_corral_async_sandbox_{loop_scope}"


def _make(loop_scope: _Scope) -> Any:
    @pytest_asyncio.fixture(loop_scope=loop_scope, name=_fixture_name(loop_scope))
    async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[None]:
        manager = sandbox_manager(request)
        if manager is None:
            yield
            return
        opened = await manager.open_async(request.node)
        try:
            yield
        finally:
            await manager.close_async(opened)

    return sandbox


_corral_async_sandbox_function = _make("function")
_corral_async_sandbox_class = _make("class")
_corral_async_sandbox_module = _make("module")
_corral_async_sandbox_package = _make("package")
_corral_async_sandbox_session = _make("session")


def _scope_name(scope: str, loop_scope: str) -> str:
    return f"_corral_async_{scope}_sandbox_{loop_scope}"


def _make_scope(scope: _Scope, loop_scope: _Scope) -> Any:
    @pytest_asyncio.fixture(scope=scope, loop_scope=loop_scope, name=_scope_name(scope, loop_scope))
    async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[None]:
        manager = sandbox_manager(request, scope=True)
        if manager is None:
            yield
            return
        opened = await manager.open_scope_async()
        try:
            yield
        finally:
            await manager.close_scope_async(opened)

    return sandbox


# An outer sandbox on the async handles for each fixture scope whose async fixtures (of
# that loop scope) write through them: the async side of the plugin's scope sandboxes.
for _scope in _SCOPES[1:]:
    for _loop_scope in _SCOPES[_SCOPES.index(_scope) :]:
        globals()[_scope_name(_scope, _loop_scope)] = _make_scope(_scope, _loop_scope)


def _is_async(func: Any) -> bool:
    """Whether *func* is an async fixture's function (pytest-asyncio < 1.0 wraps it in a
    sync function at collection, with functools.wraps)."""
    func = inspect.unwrap(func)
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


def _async_scope_fixtures(item: pytest.Item) -> list[tuple[str, str]]:
    """The (scope, loop scope) of each wider-scoped async fixture *item* requests."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found = []
    default = item.config.getini("asyncio_default_fixture_loop_scope") or None
    auto = str(item.config.getini("asyncio_mode")).lower() == "auto"
    for defs in info.name2fixturedefs.values():
        fixturedef = defs[-1]
        func = inspect.unwrap(fixturedef.func)
        if fixturedef.scope == "function" or not _is_async(func):
            continue
        if not (auto or getattr(func, "_force_asyncio_fixture", False)):
            continue  # strict mode: another plugin's (anyio's) async fixture
        loop_scope = getattr(func, "_loop_scope", None) or default or fixturedef.scope
        if loop_scope not in _SCOPES:  # pytest-asyncio 1.x: "match the fixture's scope"
            loop_scope = fixturedef.scope
        pair = (fixturedef.scope, loop_scope)
        if _SCOPES.index(loop_scope) >= _SCOPES.index(fixturedef.scope) and pair not in found:
            found.append(pair)
    return found


def _async_fixture_loop_scope(item: pytest.Item) -> str | None:
    """For a sync test: the loop scope of the function-scoped async fixtures it requests
    (pytest-asyncio runs them on its loop), None if it requests none."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for defs in info.name2fixturedefs.values():
        fixturedef = defs[-1]
        func = inspect.unwrap(fixturedef.func)  # < 1.0 wraps it at collection
        if fixturedef.scope != "function" or not _is_async(func):
            continue
        default = item.config.getini("asyncio_default_fixture_loop_scope")
        scope: str = getattr(func, "_loop_scope", None) or default or "function"
        return "function" if scope == "function" else scope
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Put the sandbox fixture of the test's loop scope first among its fixtures.

    A sync test that requests async fixtures gets it too, with their loop scope: they
    write through async handles on pytest-asyncio's loop, inside the test's sandbox. A
    test requesting wider-scoped async fixtures gets, for each (scope, loop scope), the
    scope's async sandbox fixture, placed before them.
    """
    names: list[str] = item.fixturenames  # type: ignore[attr-defined]
    for scope, loop_scope in _async_scope_fixtures(item):
        name = _scope_name(scope, loop_scope)
        if name not in names and scope in _SCOPES[1:]:
            # Before the project's fixtures of that scope: right after the sync one.
            sync = f"_corral_{scope}_sandbox"
            names.insert(names.index(sync) + 1 if sync in names else 0, name)
    marker = item.get_closest_marker("asyncio")
    if marker is not None and inspect.iscoroutinefunction(getattr(item, "obj", None)):
        scope = (
            marker.kwargs.get("loop_scope")
            or marker.kwargs.get("scope")
            or _default_test_loop_scope(item.config)
            or "function"
        )
    elif not inspect.iscoroutinefunction(getattr(item, "obj", None)):
        found = _async_fixture_loop_scope(item)
        if found is None:
            return
        scope = found
    else:
        return
    if scope not in _SCOPES:
        return
    name = _fixture_name(scope)
    if name not in names:
        # Right after the sync sandbox fixture, before every other fixture.
        anchor = names.index("_corral_sandbox") + 1 if "_corral_sandbox" in names else 0
        names.insert(anchor, name)


def _default_test_loop_scope(config: pytest.Config) -> str | None:
    try:
        value = config.getini("asyncio_default_test_loop_scope")
    except ValueError:  # added after pytest-asyncio 0.25, where tests default to "function"
        return None
    return str(value) if value else None
