"""The sync and async adapters expose the same API (names and parameters)."""

from __future__ import annotations

import inspect

import pytest

from corral.sandbox import (
    AsyncConnectSandbox,
    AsyncPoolSandbox,
    AsyncSandboxConnection,
    AsyncSandboxCursor,
    ConnectSandbox,
    PoolSandbox,
    SandboxConnection,
    SandboxCursor,
)

PAIRS = [
    (PoolSandbox, AsyncPoolSandbox),
    (ConnectSandbox, AsyncConnectSandbox),
    (SandboxConnection, AsyncSandboxConnection),
    (SandboxCursor, AsyncSandboxCursor),
]

# psycopg's own sync/async differences, mirrored on purpose.
SYNC_ONLY = {"__enter__", "__exit__", "__iter__"}
ASYNC_ONLY = {"__aenter__", "__aexit__", "__aiter__"}


def public(cls: type) -> dict[str, object]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if (not name.startswith("_") or name in SYNC_ONLY | ASYNC_ONLY)
        and name not in ("__init__",)
    }


@pytest.mark.parametrize(("sync", "async_"), PAIRS, ids=lambda c: c.__name__)
def test_same_names_and_parameters(sync: type, async_: type) -> None:
    s, a = public(sync), public(async_)
    assert set(s) - SYNC_ONLY == set(a) - ASYNC_ONLY
    for name in set(s) & set(a):
        if callable(s[name]) and callable(a[name]) and not isinstance(s[name], type):
            try:
                sig_s = inspect.signature(s[name])  # type: ignore[arg-type]
                sig_a = inspect.signature(a[name])  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            assert list(sig_s.parameters) == list(sig_a.parameters), name


def _async_controllers() -> list[type]:
    from corral.sandbox import AsyncpgPoolSandbox
    from corral.sandbox._sqlalchemy_asyncpg import AsyncpgEngineSandbox
    from corral.sandbox._sqlalchemy_psycopg import PsycopgAsyncEngineSandbox

    return [
        AsyncPoolSandbox,
        AsyncConnectSandbox,
        AsyncpgPoolSandbox,
        PsycopgAsyncEngineSandbox,
        AsyncpgEngineSandbox,
    ]


@pytest.mark.parametrize("cls", _async_controllers(), ids=lambda c: c.__name__)
def test_async_controllers_are_awaited(cls: type) -> None:
    assert cls.is_async  # type: ignore[attr-defined]
    for name in ("create_sandbox", "close_sandbox", "restore_sandbox"):
        assert inspect.iscoroutinefunction(getattr(cls, name)), name
    for name in ("allow", "share", "unshare"):  # routing never does I/O
        assert not inspect.iscoroutinefunction(getattr(cls, name)), name


def test_the_engine_controllers_keep_the_plugin_contract() -> None:
    from corral.sandbox import EngineSandbox

    assert not EngineSandbox.is_async
    for name in ("create_sandbox", "close_sandbox", "restore_sandbox", "sandboxed"):
        assert not inspect.iscoroutinefunction(getattr(EngineSandbox, name)), name
