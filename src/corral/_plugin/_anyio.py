"""anyio glue: open async sandboxes before the test's async fixtures, in the runner's task.

Registered only when anyio's pytest plugin is active, at anyio >= 4: its test runner
runs a test's async fixtures and the test itself one after the other in **one task**, so
a context variable an async fixture sets (the sandbox routing) is seen by the fixtures
after it and by the test. For each anyio test, one async fixture of ours is put first
among its function-scoped fixtures: it opens the sandboxes in that task, the test's own
async fixtures then write inside them, and its teardown, after theirs, rolls back. It
also makes the test's sync sandboxes that task's own: the runner task may be older than
them (it lives as long as the widest async fixture), and a task's context is a copy made
when it starts. Where this cannot apply, the test wrapper (:meth:`SandboxManager.wrap`)
opens the async sandboxes instead.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import AsyncIterator

import pytest

from corral._plugin._process import sandbox_manager

__all__ = ["FIXTURE", "pytest_runtest_setup", "supported"]

FIXTURE = "_corral_anyio_sandbox"


def supported() -> bool:
    """Whether the installed anyio runs fixtures and tests in one task (anyio >= 4)."""
    try:
        major = importlib.metadata.version("anyio").split(".", 1)[0]
    except importlib.metadata.PackageNotFoundError:
        return False
    return major.isdigit() and int(major) >= 4


@pytest.fixture(name=FIXTURE)
async def _corral_anyio_sandbox(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    # Run by anyio's runner (it wraps every async fixture of a test using anyio_backend).
    manager = sandbox_manager(request)
    if manager is None:
        yield
        return
    with manager.sync_sandboxes_here(request.node):
        opened = await manager.open_async(request.node)
        try:
            yield
        finally:
            await manager.close_async(opened)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Put the sandbox fixture first among an anyio test's function-scoped fixtures."""
    if not inspect.iscoroutinefunction(getattr(item, "obj", None)):
        return
    names: list[str] | None = getattr(item, "fixturenames", None)
    if names is None or "anyio_backend" not in names or FIXTURE in names:
        return
    if item.get_closest_marker("asyncio") is not None or any(
        name.startswith("_corral_async_sandbox_") for name in names
    ):
        return  # a pytest-asyncio test: its own glue opens them
    # Right after the sync sandbox fixture, before every other function-scoped fixture
    # (fixtures of wider scopes come first in the list and stay there).
    anchor = names.index("_corral_sandbox") + 1 if "_corral_sandbox" in names else 0
    names.insert(anchor, FIXTURE)
