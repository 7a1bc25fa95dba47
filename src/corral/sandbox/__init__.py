"""The sandbox: each test inside one always-rolled-back transaction (``docs/sandbox.md``).

:func:`sandbox` wraps the application's own database handle; the driver adapters are
imported lazily, so ``import corral.sandbox`` needs no driver installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, overload

from corral._lazy import lazy_exports
from corral.sandbox._controller import (
    AsyncSandboxController,
    SandboxController,
    registered,
)

if TYPE_CHECKING:
    import psycopg_pool
    import sqlalchemy
    import sqlalchemy.ext.asyncio

    from corral.sandbox._asyncpg import AsyncpgPoolSandbox
    from corral.sandbox._asyncpg_conn import AsyncpgSandboxConnection
    from corral.sandbox._psycopg_async import AsyncConnectSandbox, AsyncPoolSandbox
    from corral.sandbox._psycopg_async_conn import AsyncSandboxConnection, AsyncSandboxCursor
    from corral.sandbox._psycopg_sync import ConnectSandbox, PoolSandbox
    from corral.sandbox._psycopg_sync_conn import SandboxConnection, SandboxCursor
    from corral.sandbox._sqlalchemy import AsyncEngineSandbox
    from corral.sandbox._sqlalchemy_psycopg import EngineSandbox

__all__ = [
    "AsyncConnectSandbox",
    "AsyncEngineSandbox",
    "AsyncPoolSandbox",
    "AsyncSandboxConnection",
    "AsyncSandboxController",
    "AsyncSandboxCursor",
    "AsyncpgPoolSandbox",
    "AsyncpgSandboxConnection",
    "ConnectSandbox",
    "EngineSandbox",
    "PoolSandbox",
    "SandboxConnection",
    "SandboxController",
    "SandboxCursor",
    "registered",
    "sandbox",
]

_LAZY = {
    "AsyncConnectSandbox": "corral.sandbox._psycopg_async",
    "AsyncEngineSandbox": "corral.sandbox._sqlalchemy",
    "EngineSandbox": "corral.sandbox._sqlalchemy_psycopg",
    "AsyncpgPoolSandbox": "corral.sandbox._asyncpg",
    "AsyncpgSandboxConnection": "corral.sandbox._asyncpg_conn",
    "AsyncPoolSandbox": "corral.sandbox._psycopg_async",
    "AsyncSandboxConnection": "corral.sandbox._psycopg_async_conn",
    "AsyncSandboxCursor": "corral.sandbox._psycopg_async_conn",
    "ConnectSandbox": "corral.sandbox._psycopg_sync",
    "PoolSandbox": "corral.sandbox._psycopg_sync",
    "SandboxConnection": "corral.sandbox._psycopg_sync_conn",
    "SandboxCursor": "corral.sandbox._psycopg_sync_conn",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


@overload
def sandbox(
    handle: psycopg_pool.AsyncConnectionPool[Any],
    *,
    mode: str | None = ...,
    is_async: bool | None = ...,
    **options: Any,
) -> AsyncPoolSandbox: ...


@overload
def sandbox(
    handle: psycopg_pool.ConnectionPool[Any],
    *,
    mode: str | None = ...,
    is_async: bool | None = ...,
    **options: Any,
) -> PoolSandbox: ...


@overload
def sandbox(
    handle: sqlalchemy.ext.asyncio.AsyncEngine,
    *,
    mode: str | None = ...,
    is_async: bool | None = ...,
    **options: Any,
) -> AsyncEngineSandbox: ...


@overload
def sandbox(
    handle: sqlalchemy.Engine,
    *,
    mode: str | None = ...,
    is_async: bool | None = ...,
    **options: Any,
) -> EngineSandbox: ...


@overload
def sandbox(
    handle: str | Callable[..., Any],
    *,
    mode: str | None = ...,
    is_async: Literal[True],
    **options: Any,
) -> AsyncConnectSandbox: ...


@overload
def sandbox(
    handle: Callable[..., Awaitable[Any]],
    *,
    mode: str | None = ...,
    is_async: None = ...,
    **options: Any,
) -> AsyncConnectSandbox: ...


@overload
def sandbox(
    handle: str | Callable[..., Any],
    *,
    mode: str | None = ...,
    is_async: Literal[False] | None = ...,
    **options: Any,
) -> ConnectSandbox: ...


@overload
def sandbox(
    handle: Any,
    *,
    mode: str | None = ...,
    is_async: bool | None = ...,
    **options: Any,
) -> SandboxController[Any] | AsyncSandboxController[Any]: ...


def sandbox(
    handle: Any,
    *,
    mode: str | None = None,
    is_async: bool | None = None,
    **options: Any,
) -> SandboxController[Any] | AsyncSandboxController[Any]:
    """Wrap the application's database handle; the app then uses the result instead.

    :param handle: a ``psycopg_pool.ConnectionPool`` or ``AsyncConnectionPool``; a
        conninfo string; a callable returning a new psycopg connection (a coroutine
        function for ``AsyncConnection``); an ``asyncpg.Pool``; or a SQLAlchemy
        ``Engine`` / ``AsyncEngine`` (``postgresql+psycopg`` or ``+asyncpg``), which is
        sandboxed in place: keep using the engine itself.
    :param mode: ``"sandbox"`` or ``"normal"`` (transparent pass-through). None reads
        ``$CORRAL_SANDBOX_MODE`` and defaults to ``"normal"``, so production code can
        wrap its handle unconditionally and the test run (the corral pytest plugin sets
        the variable) switches it on.
    :param is_async: for a conninfo string or a factory corral cannot inspect: whether
        the app uses ``psycopg.AsyncConnection``.
    :param options: ``lock_timeout`` (seconds, default 5), ``checkout_timeout``
        (seconds, default 30), ``isolation_level``, ``check_deferred``, ``max_idle``
        (factories, asyncpg pools, engines), ``own_connection`` (default False: handles
        of one driver on one database share a test's connection and transaction; True
        keeps this handle's sandboxes on a connection of its own); see
        :class:`PoolSandbox`, :class:`ConnectSandbox`, :class:`AsyncpgPoolSandbox`,
        :class:`EngineSandbox`.
    :returns: the controller: the handle's API plus ``create_sandbox()``,
        ``close_sandbox()``, ``restore_sandbox()``, ``sandboxed()``, ``allow()``,
        ``share()``.
    :raises TypeError: *handle* is nothing corral knows how to sandbox.
    """
    root = type(handle).__module__.split(".", 1)[0]
    if root == "asyncpg":
        from asyncpg import Pool

        if isinstance(handle, Pool):
            from corral.sandbox._asyncpg import AsyncpgPoolSandbox

            return AsyncpgPoolSandbox(handle, mode=mode, **options)
    if root == "sqlalchemy":
        from corral.sandbox._sqlalchemy_engines import sandbox_engine

        controller: SandboxController[Any] | AsyncSandboxController[Any]
        controller = sandbox_engine(handle, mode=mode, **options)
        return controller
    if root == "psycopg_pool":
        from psycopg_pool import AsyncConnectionPool, ConnectionPool

        if isinstance(handle, AsyncConnectionPool):
            from corral.sandbox._psycopg_async import AsyncPoolSandbox

            return AsyncPoolSandbox(handle, mode=mode, **options)
        if isinstance(handle, ConnectionPool):
            from corral.sandbox._psycopg_sync import PoolSandbox

            return PoolSandbox(handle, mode=mode, **options)
    if isinstance(handle, str) or callable(handle):
        if is_async is None:
            is_async = not isinstance(handle, str) and _returns_awaitable(handle)
        if is_async:
            from corral.sandbox._psycopg_async import AsyncConnectSandbox

            return AsyncConnectSandbox(handle, mode=mode, **options)
        from corral.sandbox._psycopg_sync import ConnectSandbox

        return ConnectSandbox(handle, mode=mode, **options)
    raise TypeError(
        f"corral cannot sandbox a {type(handle).__module__}.{type(handle).__qualname__}: "
        "pass a psycopg_pool.ConnectionPool / AsyncConnectionPool, a conninfo string, or "
        "a function returning a new psycopg connection"
    )


def _returns_awaitable(factory: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(factory) or inspect.iscoroutinefunction(
        getattr(factory, "__call__", None)  # noqa: B004 - instances with async __call__
    )
