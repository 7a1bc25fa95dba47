"""A sandbox around every test: sync handles from a fixture, async ones on the test's loop.

Async handles' sandboxes must be opened on the test's event loop and in its context:
by a fixture of the pytest-asyncio or anyio glue (``_asyncio``, ``_anyio``) that runs
before the test's async fixtures, else by the coroutine the test runs as (the wrapper),
the one place certain to qualify whatever runs it. ``no_sandbox`` tests switch every
handle to normal mode (fixture scopes' levels closed first, async ones on their own
loop) and get a fresh database afterwards, and the handles drop their idle connections
to the old one (``discard_idle()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from corral import sandbox as _sandbox
from corral._plugin._settings import ENV_SANDBOX_MODE
from corral._plugin._warnings import WrongDatabaseWarning

if TYPE_CHECKING:
    from corral._plugin._database import WorkerDatabase

__all__ = ["SandboxManager", "WrongDatabaseWarning"]

log = logging.getLogger("corral.pytest")

AnyController = _sandbox.SandboxController[Any] | _sandbox.AsyncSandboxController[Any]
# One scope's sandbox level on one handle: the handle, its sandbox, the level's depth.
_Level = tuple[AnyController, Any, int]


def _own_pool(controller: AnyController) -> Any:
    """The driver pool a controller wraps (its own attribute: never one it forwards)."""
    return vars(controller).get("pool")


def _closed(controller: AnyController) -> bool:
    # A pool the app closed (or has not opened yet) cannot give a sandbox a connection.
    pool = _own_pool(controller)
    if pool is None:
        return False
    closed = getattr(pool, "closed", None)  # psycopg_pool
    if isinstance(closed, bool):
        return closed
    is_closing = getattr(pool, "is_closing", None)  # asyncpg
    return bool(is_closing()) if callable(is_closing) else False


def _on_another_loop(controller: AnyController) -> bool:
    """Whether an async handle's pool runs on an event loop other than the running one.

    A pool opened by a session-loop fixture cannot serve a test on a function-scoped loop
    (its checkouts would wait forever); such a test cannot use that pool either, so it
    gets no sandbox on it. psycopg_pool exposes no loop, but an open pool runs a
    scheduler task named after it (``{pool.name}-scheduler``, psycopg_pool 3.1 to 3.3):
    when the running loop has no such task, the pool's tasks run on another loop. Pools
    of any other kind (asyncpg's, which connect on the loop that uses them) are taken to
    be on the running loop.
    """
    pool = _own_pool(controller)
    name = getattr(pool, "name", None)
    if not isinstance(name, str) or getattr(pool, "closed", None) is not False:
        return False  # not a psycopg_pool pool, or not open: nothing runs anywhere
    if not type(pool).__module__.startswith("psycopg_pool"):
        return False
    scheduler = f"{name}-scheduler"
    return not any(task.get_name() == scheduler for task in asyncio.all_tasks())


def _candidates(is_async: bool) -> list[AnyController]:
    """Sandbox-mode handles of that kind, oldest first.

    One that already has a sandbox here (a module- or session-scoped fixture opened it)
    gets a nested one: each test rolls back to the fixture's data, Django's
    ``setUpTestData`` for any driver.
    """
    return [c for c in _sandbox.registered() if c.is_async == is_async and not _closed(c)]


def _close_all(controllers: list[AnyController]) -> None:
    """Close every sandbox level the sync *controllers* have open in this context.

    Handles sharing a connection (docs/sandbox.md, "Patterns", 2) close level by level,
    innermost first, each level by its own handles.
    """
    while (member := _next_to_close(controllers)) is not None:
        member.close_sandbox()


def _next_to_close(controllers: list[AnyController]) -> AnyController | None:
    """The handle to close a level of next (None: none has one open in this context)."""
    left = [c for c in reversed(controllers) if c._router.owned() is not None]
    # A handle of the innermost level of its sandbox; else the first, whose error names
    # the handles in the way.
    return next((c for c in left if _of_innermost(c)), left[0]) if left else None


async def _close_levels(levels: list[tuple[AnyController, Any]]) -> None:
    """Close the async sandboxes *levels* name (every level of each), as _close_all does
    for sync ones: run on their loop, in a task of its own that binds them."""
    with contextlib.ExitStack() as stack:
        for controller, box in levels:
            stack.enter_context(controller._router.bind(box))
        controllers = [controller for controller, _ in levels]
        while (member := _next_to_close(controllers)) is not None:
            await member.close_sandbox()  # type: ignore[misc]


def _of_innermost(controller: AnyController) -> bool:
    box: Any = controller._router.owned()
    return box is not None and controller in box.members[-1]


def _describe(controller: AnyController) -> str:
    pool = _own_pool(controller)
    return f"sandbox({pool!r})" if pool is not None else repr(controller)


def _wrong_database(controller: AnyController, actual: str, expected: str) -> WrongDatabaseWarning:
    return WrongDatabaseWarning(
        f"corral: the sandboxed handle {_describe(controller)} is connected to database "
        f"{actual!r}, not to this process's database {expected!r}, so the tests' queries "
        "through it miss the database built from corral_schema. The app read its URL "
        "before corral set it (at import, in a cached settings object) or from a variable "
        "corral does not set: name that variable in corral_database_env (see "
        "docs/adopting.md)."
    )


def _dbname(real: Any) -> str | None:
    """The database of a psycopg connection, from libpq (no round trip); else None."""
    info = getattr(real, "info", None)
    name = getattr(info, "dbname", None)
    return name if isinstance(name, str) else None


def _scopes_with_user_fixtures(session: pytest.Session) -> set[tuple[str, str]]:
    """Each (scope, node id) under which a test uses a fixture of that scope defined under
    the rootdir (the project's own, not a plugin's): one pass over the collected tests."""
    root = str(session.config.rootpath)
    own: dict[Any, bool] = {}  # fixture function -> whether the project defined it

    def project_defined(func: Any) -> bool:
        if func not in own:
            try:
                # pytest-asyncio < 1.0 wraps async fixtures in its own (functools.wraps)
                path = inspect.getfile(inspect.unwrap(func))
            except TypeError:
                path = ""
            own[func] = (
                not func.__module__.startswith("corral.")
                and path.startswith(root)
                and "site-packages" not in path
            )
        return own[func]

    found: set[tuple[str, str]] = set()
    for item in session.items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        scopes = {
            defs[-1].scope
            for defs in info.name2fixturedefs.values()
            if defs[-1].scope != "function" and project_defined(defs[-1].func)
        }
        if scopes:
            chain = [node.nodeid for node in item.listchain()]
            found.update((scope, nodeid) for scope in scopes for nodeid in chain)
    return found


@contextlib.contextmanager
def _bound_on(
    loop: asyncio.AbstractEventLoop,
    opening: Coroutine[Any, Any, list[Any]],
    closing: Callable[[list[Any]], Coroutine[Any, Any, None]],
) -> Iterator[None]:
    """Run *opening* on *loop* in a task with a copy of this context; within the block,
    the sandboxes it opened are this context's own; then *closing* (of what *opening*
    returned) runs on *loop*, in a task that sees them."""
    context = contextvars.copy_context()
    opened = loop.run_until_complete(loop.create_task(opening, context=context))
    owned = context.run(lambda: [(c, c._router.owned()) for c in _sandbox.registered()])
    with contextlib.ExitStack() as stack:
        for controller, box in owned:
            if box is not None:
                stack.enter_context(controller._router.bind(box))
        try:
            yield
        finally:
            if not loop.is_closed():
                loop.run_until_complete(closing(opened))


_ASYNC_HANDLES = pytest.StashKey[list["weakref.ref[AnyController]"]]()
# The sync sandboxes of a test, for an async runner whose task predates them (anyio's).
_SYNC_BOXES = pytest.StashKey[list[tuple[AnyController, Any]]]()
# Set once the async sandboxes of a test are open (by the pytest-asyncio fixture or by the
# test wrapper, whichever runs first), so the other does not open a second level.
_ASYNC_OPENED = pytest.StashKey[bool]()


@contextlib.contextmanager
def _warnings_at(test: Callable[..., Any]) -> Iterator[None]:
    """Warnings aimed at the test's caller (``stacklevel=2`` in its body) would land on
    :meth:`SandboxManager.wrap`'s line and blame corral: they land on the test instead.
    Every other warning is passed on as it was raised."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        code = test.__code__
        for w in caught:
            here = w.filename == __file__
            warnings.warn_explicit(
                w.message,
                w.category,
                code.co_filename if here else w.filename,
                code.co_firstlineno if here else w.lineno,
                source=w.source,
            )


class SandboxManager:
    """Opens and closes the per-test sandboxes of one test process.

    :param database: this process's database, recreated after ``no_sandbox`` tests
        (None when corral's database part is off).
    :param enabled: False (``corral_sandbox = false``): leave every handle alone.
    """

    def __init__(self, database: WorkerDatabase | None, *, enabled: bool = True) -> None:
        self.database = database
        self.enabled = enabled
        self.opened = 0
        self.seconds = 0.0
        # Handles whose database was compared with ours: each once, at its first sandbox.
        self._checked: weakref.WeakSet[Any] = weakref.WeakSet()
        # Async handles whose idle connections died with a recreated database; they are
        # refreshed on their own loop, by the next async test.
        self._stale: weakref.WeakSet[Any] = weakref.WeakSet()
        #: the (scope, node id) pairs that get a sandbox level (wants_scope), found at the
        #: first scope fixture
        self._scopes: set[tuple[str, str]] | None = None
        #: the async scope levels open now, each with the loop it was opened on,
        #: outermost first (a no_sandbox test closes them on that loop)
        self._async_scopes: list[tuple[asyncio.AbstractEventLoop, list[_Level]]] = []

    # ------------------------------------------------------------------ sync side

    def wants_scope(self, request: pytest.FixtureRequest) -> bool:
        """Whether a test under this scope's node requests a fixture of that scope from
        the project's own files (conftest, test modules): only then does the scope get a
        sandbox level of its own (each one is a round trip, and keeps now() fixed)."""
        if not self.enabled:
            return False
        node, scope = request.node, request.scope
        if scope == "class" and getattr(request, "cls", None) is None:
            return False  # a test outside any class: class scope is the test itself
        if self._scopes is None:
            self._scopes = _scopes_with_user_fixtures(request.session)
        return (scope, node.nodeid) in self._scopes

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """Add the block's time to :attr:`seconds` (what the sandboxes cost the run)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """An outer sandbox level on every sync handle for one fixture scope (session,
        package, module, class): that scope's fixtures write inside it, each test nests
        inside it, and it rolls back when the scope ends."""
        if not self.enabled:
            yield
            return
        opened: list[tuple[AnyController, Any, int]] = []
        with self._timed():
            for controller in _candidates(is_async=False):
                controller.create_sandbox()
                controller.share()
                box = controller._router.owned()
                opened.append((controller, box, box.plan.depth if box is not None else 0))
        try:
            yield
        finally:
            errors = []
            for controller, box, depth in reversed(opened):
                # A no_sandbox test in the scope closed every level (its database was
                # replaced): nothing of this scope is left to roll back.
                if box is None or box.closed or controller._router.owned() is not box:
                    continue
                if box.plan.depth == depth:
                    error = self._close_sync(controller)
                    if error is not None:
                        errors.append(error)
            if errors:
                raise errors[0]

    @contextlib.contextmanager
    def around(self, item: pytest.Item) -> Iterator[None]:
        """Around one test (setup to teardown): sync sandboxes, or the no_sandbox switch."""
        if item.get_closest_marker("no_sandbox") is not None:
            with self.unsandboxed():
                yield
            return
        if not self.enabled:
            yield
            return
        # Async handles get their sandbox inside the test's coroutine, but only those that
        # exist now: handles the test's own fixtures create are those fixtures' business.
        item.stash[_ASYNC_HANDLES] = [weakref.ref(c) for c in _candidates(is_async=True)]
        opened: list[AnyController] = []
        try:
            with self._timed():
                for controller in _candidates(is_async=False):
                    controller.create_sandbox()
                    opened.append(controller)
                    # One test at a time per process: threads and executors with no sandbox
                    # of their own (a TestClient's, a server's) join this test's.
                    controller.share()
                item.stash[_SYNC_BOXES] = [(c, c._router.owned()) for c in opened]
            for controller, box in item.stash[_SYNC_BOXES]:
                if self._unchecked(controller):
                    self._compare(item, controller, _dbname(getattr(box, "real", None)))
            yield
        finally:
            item.stash[_SYNC_BOXES] = []  # items live as long as the session: no references
            with self._timed():
                errors = [e for e in (self._close_sync(c) for c in reversed(opened)) if e]
                self.opened += len(opened)
            if errors:
                raise errors[0]

    def _unchecked(self, controller: AnyController) -> bool:
        """Whether *controller*'s database is still to be compared (then it is marked)."""
        if self.database is None or controller in self._checked:
            return False
        self._checked.add(controller)
        return True

    def _compare(self, item: pytest.Item, controller: AnyController, actual: str | None) -> None:
        """Warn, on *item*, when *controller*'s connection is not to this process's clone."""
        assert self.database is not None
        if actual is not None and actual != self.database.name:
            item.warn(_wrong_database(controller, actual, self.database.name))

    @staticmethod
    def _close_sync(controller: AnyController) -> BaseException | None:
        try:
            controller.close_sandbox()
        except Exception as exc:
            return exc
        return None

    @contextlib.contextmanager
    def unsandboxed(self) -> Iterator[None]:
        """Handles in normal mode for one test; then a fresh database, handles refreshed."""
        switched = _sandbox.registered()
        # Fixture scopes' sandboxes too: this test commits for real, and the database is
        # replaced afterwards, their data with it.
        _close_all([c for c in switched if not c.is_async])
        self._close_async_scopes()
        for controller in switched:
            controller.mode = "normal"
        saved = os.environ.get(ENV_SANDBOX_MODE)
        os.environ[ENV_SANDBOX_MODE] = "normal"  # handles the test itself creates
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(ENV_SANDBOX_MODE, None)
            else:
                os.environ[ENV_SANDBOX_MODE] = saved
            for controller in switched:
                controller.mode = "sandbox"
            if self.database is not None:
                # Whatever the test committed must not reach the next test.
                self.database.recreate()
                self.refresh(switched)

    def _close_async_scopes(self) -> None:
        """Close every async scope level, each on the loop it was opened on.

        Called between tests (no_sandbox), when pytest-asyncio's loops are not running;
        the scope fixtures' teardown then finds their levels closed and skips them.
        """
        while self._async_scopes:
            loop, opened = self._async_scopes.pop()  # innermost scope first
            levels = [(c, box) for c, box, _ in opened if box is not None and not box.closed]
            if not levels:
                continue
            if loop.is_closed() or loop.is_running():
                raise RuntimeError(
                    "corral: a no_sandbox test cannot close the async sandbox level of a "
                    f"fixture scope: its event loop {loop!r} is closed or running. Move "
                    "the no_sandbox test out of the scope of those async fixtures."
                )
            loop.run_until_complete(_close_levels(levels))

    def refresh(self, controllers: list[AnyController]) -> None:
        """Drop idle connections to the database that was just replaced (``discard_idle``)."""
        for controller in controllers:
            if controller.is_async:
                self._stale.add(controller)  # on its own loop, by the next async test
                continue
            if _closed(controller):
                continue
            try:
                controller.discard_idle()
            except Exception as exc:
                log.warning("refreshing %r after recreating the database: %s", controller, exc)

    # ------------------------------------------------------------------ async side

    @contextlib.contextmanager
    def sync_sandboxes_here(self, item: pytest.Item) -> Iterator[None]:
        """Make *item*'s sync sandboxes this context's own for the block.

        For a task that was created before they opened: anyio's test runner task lives
        as long as its widest async fixture, and a task's context is a copy made when
        it starts, so without this a sync handle used in the test would find no sandbox.
        """
        with contextlib.ExitStack() as stack:
            for controller, box in item.stash.get(_SYNC_BOXES, []):
                if box is not None and not box.closed:
                    stack.enter_context(controller._router.bind(box))
            yield

    def wrap(
        self, test: Callable[..., Coroutine[Any, Any, Any]], item: pytest.Item
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        """The test coroutine function, with async sandboxes opened inside its own task."""

        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> Any:
            opened = await self.open_async(item)
            try:
                with _warnings_at(test):
                    return await test(*args, **kwargs)
            finally:
                try:
                    await self.close_async(opened)
                finally:
                    client = getattr(item, "funcargs", {}).get("corral_async")
                    if client is not None:
                        await client.aclose()  # on the loop its connection belongs to

        return run

    async def open_async(self, item: pytest.Item) -> list[AnyController]:
        """Open sandboxes on the async handles of *item* not yet sandboxed here.

        Runs in the task (and so on the loop and in the context) that will use them.
        Nothing to open off asyncio (anyio on trio): the async drivers corral sandboxes
        run on asyncio only, so such a test cannot use them either.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return []
        await self._refresh_stale()
        if not self.enabled or item.get_closest_marker("no_sandbox") is not None:
            return []
        if item.stash.get(_ASYNC_OPENED, False):
            return []
        item.stash[_ASYNC_OPENED] = True
        opened: list[AnyController] = []
        with self._timed():
            try:
                for ref in item.stash.get(_ASYNC_HANDLES, []):
                    controller = ref()
                    if controller is None or _closed(controller) or _on_another_loop(controller):
                        continue
                    outer: Any = controller._router.owned()
                    # A scope's sandbox on another loop (a test on a loop of its own) cannot
                    # be nested in: the test gets an independent one.
                    nest = outer is None or outer.loop is asyncio.get_running_loop()
                    await controller.create_sandbox(nest=nest)  # type: ignore[misc]
                    opened.append(controller)
                    if self._unchecked(controller):
                        box = controller._router.owned()
                        real: Any = getattr(box, "real", None)
                        name = _dbname(real)
                        if name is None and hasattr(real, "fetchval"):  # asyncpg: ask, once
                            name = await real.fetchval("SELECT current_database()")
                        self._compare(item, controller, name)
                    controller.share()  # tasks of this loop started with a context of their own
            except BaseException:
                await self.close_async(opened)
                raise
        return opened

    @contextlib.contextmanager
    def opened_on(self, loop: asyncio.AbstractEventLoop, item: pytest.Item) -> Iterator[None]:
        """Open *item*'s async sandboxes on *loop* from sync code, and make them this
        context's own for the block; closed on *loop* at its end.

        For pytest-asyncio < 0.26 (``_asyncio_legacy``), which runs each async fixture and
        the test in a task of its own that copies the main thread's context when it is
        created: called there before them, it routes them all to these sandboxes.
        """
        with _bound_on(loop, self.open_async(item), self.close_async):
            yield

    @contextlib.contextmanager
    def scope_opened_on(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        """:meth:`opened_on` for one fixture scope's level (:meth:`open_scope_async`)."""
        with _bound_on(loop, self.open_scope_async(), self.close_scope_async):
            yield

    async def open_scope_async(self) -> list[_Level]:
        """An outer sandbox level on every async handle for one fixture scope, on the
        running loop (the scope's): :meth:`scope` for async fixtures of that scope with
        the same loop scope. Tests on that loop nest inside it."""
        if not self.enabled:
            return []
        opened: list[_Level] = []
        self._async_scopes.append((asyncio.get_running_loop(), opened))
        with self._timed():
            try:
                for controller in _candidates(is_async=True):
                    if _on_another_loop(controller) or not controller.sandboxing:
                        continue
                    await controller.create_sandbox()  # type: ignore[misc]
                    controller.share()
                    box: Any = controller._router.owned()
                    opened.append((controller, box, box.plan.depth if box is not None else 0))
            except BaseException:
                await self.close_scope_async(opened)
                raise
        return opened

    async def close_scope_async(self, opened: list[_Level]) -> None:
        """Roll back what :meth:`open_scope_async` opened and is still open."""
        self._async_scopes = [e for e in self._async_scopes if e[1] is not opened]
        await self.close_async(
            [
                controller
                for controller, box, depth in opened
                if box is not None
                and not box.closed
                and box.plan.depth == depth
                and controller._router.owned() is box
            ]
        )

    async def close_async(self, opened: list[AnyController]) -> None:
        """Roll back what :meth:`open_async` opened (all of it, even if one fails)."""
        first: BaseException | None = None
        with self._timed():
            for controller in reversed(opened):
                try:
                    await controller.close_sandbox()  # type: ignore[misc]
                except Exception as exc:
                    first = first or exc
            self.opened += len(opened)
        if first is not None:
            raise first

    async def _refresh_stale(self) -> None:
        for controller in list(self._stale):
            if _on_another_loop(controller):
                continue  # refreshed later, by a test on its own loop
            self._stale.discard(controller)
            if _closed(controller):
                continue
            try:
                await controller.discard_idle()
            except Exception as exc:
                log.warning("refreshing %r after recreating the database: %s", controller, exc)
