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

from corral._plugin._process import STATE

__all__ = ["pytest_runtest_setup"]

_Scope = Literal["function", "class", "module", "package", "session"]
_SCOPES: tuple[_Scope, ...] = ("function", "class", "module", "package", "session")


def _fixture_name(loop_scope: str) -> str:
    return f"_corral_async_sandbox_{loop_scope}"


def _make(loop_scope: _Scope) -> Any:
    @pytest_asyncio.fixture(loop_scope=loop_scope, name=_fixture_name(loop_scope))
    async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[None]:
        process = request.config.stash.get(STATE, None)
        if process is None or process.manager is None:
            yield
            return
        opened = await process.manager.open_async(request.node)
        try:
            yield
        finally:
            await process.manager.close_async(opened)

    return sandbox


_corral_async_sandbox_function = _make("function")
_corral_async_sandbox_class = _make("class")
_corral_async_sandbox_module = _make("module")
_corral_async_sandbox_package = _make("package")
_corral_async_sandbox_session = _make("session")


def _async_fixture_loop_scope(item: pytest.Item) -> str | None:
    """For a sync test: the loop scope of the function-scoped async fixtures it requests
    (pytest-asyncio runs them on its loop), None if it requests none."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    for defs in info.name2fixturedefs.values():
        fixturedef = defs[-1]
        func = fixturedef.func
        if fixturedef.scope != "function" or not (
            inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
        ):
            continue
        default = item.config.getini("asyncio_default_fixture_loop_scope")
        scope: str = getattr(func, "_loop_scope", None) or default or "function"
        return "function" if scope == "function" else scope
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Put the sandbox fixture of the test's loop scope first among its fixtures.

    A sync test that requests async fixtures gets it too, with their loop scope: they
    write through async handles on pytest-asyncio's loop, inside the test's sandbox.
    """
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
    names: list[str] = item.fixturenames  # type: ignore[attr-defined]
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
