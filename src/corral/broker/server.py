"""The broker process side: a private Unix socket served by asyncio on a background thread.

:class:`Broker` owns the socket file, the event loop thread and the lifecycle; each
connection only pumps bytes through the sans-IO protocol and :class:`~._core.Core`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from corral._lifecycle import Running
from corral.broker._connection import Connection
from corral.broker._core import Core
from corral.broker._socketfile import BACKLOG, bind_at, bind_private, cleanup_files
from corral.broker._spin import SpinningSelector, budget_from_env
from corral.broker._store import Store
from corral.errors import BrokerError

__all__ = ["Broker"]

log = logging.getLogger("corral.broker")

#: Seconds the broker's thread has to get ready (it takes milliseconds).
_START_TIMEOUT = 30.0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Broker(Running):
    """A run-scoped in-memory broker on a private Unix socket.

    ``start()`` serves on a background thread and returns the socket path once the
    broker accepts connections; ``stop()`` drains and removes everything. Use it as a
    context manager (``with`` or ``async with``) to get both.

    :param require_ttl: refuse ``set`` without a TTL (``ttl_required``), as Node does.
    :param default_ttl: seconds to keep keys and leases set without a TTL.
    :param max_items: most things at once (0 = unlimited): keys, pools, locks, barriers,
        throttles, ``once`` states and queued items; a request that would add one beyond
        gets ``max_items`` (updates of existing keys always work).
    :param max_value_size: most characters in one value's JSON (``too_large``).
    :param max_request_size: most bytes in one request line; longer lines get
        ``too_large`` and their connection is closed.
    :param secret: shared secret (str or bytes); clients must authenticate. Never logged.
    :param sweep_interval: seconds between sweeps. Expiry itself is exact (the broker
        wakes at the next deadline); a key that expired keeps answering ``expired``
        rather than ``not_found`` until the sweep after next forgets it.
    :param idle_timeout: stop by itself after this many seconds with no request and no
        open connection (None: never).
    :param debug: log requests at DEBUG level on ``corral.broker`` (to stderr if no
        handler is configured).
    :param socket_path: where to listen; default a random name in a fresh 0700 directory.
    :param legacy_hmac: accept Node-style per-message ``hmac`` (replayable) when a
        secret is set; corral's clients use challenge-response instead.
    :param drain_timeout: seconds ``stop()`` waits for answers to reach slow clients.
    :param max_bytes: most bytes all of those take, by the broker's estimate
        (``approximateStoreBytes``; 0 = unlimited); beyond it, ``max_items`` too.
    :param spin: seconds to poll for more requests before sleeping, after a wake-up that
        brought work from another process (default ``$CORRAL_SPIN_US`` microseconds, else
        50 µs; 0 = never). See ``docs/broker.md``, "Why polling".
    """

    def __init__(
        self,
        require_ttl: bool = True,
        default_ttl: float = 1800.0,
        max_items: int = 10_000,
        max_value_size: int = 256 * 1024,
        max_request_size: int = 1024 * 1024,
        secret: str | bytes | None = None,
        sweep_interval: float = 30.0,
        idle_timeout: float | None = None,
        debug: bool = False,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        legacy_hmac: bool = True,
        drain_timeout: float = 5.0,
        spin: float | None = None,
        max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        for name, number in (("default_ttl", default_ttl), ("sweep_interval", sweep_interval)):
            if not number > 0:
                raise ValueError(f"{name} must be positive, got {number!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout!r}")
        for name, limit in (
            ("max_items", max_items),
            ("max_value_size", max_value_size),
            ("max_request_size", max_request_size),
            ("max_bytes", max_bytes),
        ):
            if limit < 0 or (limit == 0 and name not in ("max_items", "max_bytes")):
                raise ValueError(f"{name} must be positive, got {limit!r}")
        if isinstance(secret, str):
            secret = secret.encode()
        if secret is not None and not secret:
            raise ValueError("secret must not be empty (pass None for no secret)")
        self.require_ttl = require_ttl
        self.default_ttl = float(default_ttl)
        self.max_items = max_items
        self.max_value_size = max_value_size
        self.max_request_size = max_request_size
        self.max_bytes = max_bytes
        self._secret = secret
        self.sweep_interval = float(sweep_interval)
        self.idle_timeout = idle_timeout
        self.debug = debug
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.legacy_hmac = legacy_hmac
        self.drain_timeout = drain_timeout
        self.spin = budget_from_env(spin)

        self._lifecycle = threading.Lock()
        self._path: str | None = None
        self._inode = 0
        self._private_dir: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._finished = threading.Event()
        self._finished.set()
        self._core: Core | None = None
        self._connections: dict[int, Connection] = {}
        self._selector: SpinningSelector | None = None
        self._next_session = 0
        self._started_at = 0.0
        self._last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._periodic: dict[str, asyncio.TimerHandle] = {}
        self._timer_at: float | None = None
        self._env_saved: dict[str, str | None] = {}
        self._atexit: Any = None
        self.instance = ""

    # ------------------------------------------------------------------ public

    @property
    def path(self) -> str:
        """The socket path.

        :raises BrokerError: the broker is not running.
        """
        if self._path is None:
            raise BrokerError("the broker is not running: call start() first")
        return self._path

    @property
    def running(self) -> bool:
        return not self._finished.is_set()

    def start(self) -> str:
        """Bind the socket, serve on a background thread, return the path once ready.

        Sets ``EPHEMERAL_PIPE`` (and ``EPHEMERAL_SECRET`` when a secret is set) in
        ``os.environ`` so child processes find the broker; ``stop()`` restores them.

        :raises BrokerAlreadyRunning: a live broker answers at ``socket_path``.
        :raises BrokerError: the socket cannot be created there.
        """
        with self._lifecycle:
            if self._thread is not None:
                assert self._path is not None
                return self._path
            sock = self._bind()
            self._launch(sock)
            assert self._path is not None
            self._export_env()
            log.info("broker listening on %s", self._path)
            return self._path

    def _serve_bound(
        self, sock: socket.socket, path: str, inode: int, private_dir: str | None
    ) -> None:
        """Serve on *sock*, bound at *path* and listening already; the environment is left
        alone. The pytest plugin binds the socket at start-up and starts the broker at the
        first connection; the broker then owns the socket file (``stop()`` removes it).

        :raises BrokerError: the broker failed to start (the files are removed).
        """
        with self._lifecycle:
            if self._thread is not None:
                raise RuntimeError("the broker is running already")
            self._path, self._inode, self._private_dir = path, inode, private_dir
            sock.setblocking(False)
            self._launch(sock)

    def _launch(self, sock: socket.socket) -> None:
        # Under self._lifecycle, with self._path set: serve on a thread, wait until ready.
        if self.debug:
            _enable_debug_logging()
        self.instance = secrets.token_hex(8)
        ready = threading.Event()
        failure: list[BaseException] = []
        self._finished.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ready, failure), name="corral-broker", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            # Nothing in start-up waits without a bound (docs/pytest.md): a loop that
            # never got ready is told to stop, and the caller gets the reason (recorded
            # before the stop: the loop's own "stopped before Future completed" comes second).
            failure.insert(0, TimeoutError(f"not ready after {_START_TIMEOUT:g} s"))
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
        if failure:
            self._thread.join(_START_TIMEOUT)
            self._thread = None
            sock.close()
            self._remove_files()
            raise BrokerError(f"the broker failed to start: {failure[0]}") from failure[0]

    def stop(self, timeout: float | None = None) -> None:
        """Drain, close every connection, remove the socket and its directory, wipe state.

        Idempotent; safe to call from any thread but the broker's own.

        :param timeout: seconds to let slow clients receive their last answers
            (default: ``drain_timeout``).
        """
        with self._lifecycle:
            thread, loop = self._thread, self._loop
            if thread is None:
                return
            if threading.current_thread() is thread:
                raise RuntimeError("Broker.stop() called from the broker's own thread")
            drain = self.drain_timeout if timeout is None else timeout
            if loop is not None and not self._finished.is_set():
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(self._request_stop, drain)
            thread.join()
            self._thread = None
            self._restore_env()
            self._remove_files()
            log.info("broker stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the broker stops (``stop()``, or ``idle_timeout``); True if it did."""
        return self._finished.wait(timeout)

    def holdings(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """What clients hold right now, oldest first, e.g. for an end-of-run report.

        Each entry: ``kind`` (``"lease"``, ``"lock"``, ``"pool"``, ``"once"``), ``key``
        (the lease key, lock/pool name or once key), ``holder`` (the worker id of a
        lease; else who: worker, or pid), ``value`` (lease number, lock token, pool
        item), ``since`` and ``expires`` (wall-clock seconds; None when held until
        released), ``connection`` (the holding connection's id, None for one-shot
        clients). Read on the broker's own
        thread, so it is a consistent snapshot. Empty when the broker is not running.
        """
        loop, core = self._loop, self._core
        if loop is None or core is None or self._finished.is_set():
            return []

        async def snapshot() -> list[dict[str, Any]]:
            now = time.time()
            return [
                {
                    "kind": "lease",
                    "key": lease["key"],
                    "holder": worker,
                    "value": lease["value"],
                    "since": lease["since"] / 1000,
                    "expires": lease["expires"] / 1000,
                    "connection": lease["owner"],
                }
                for worker, lease in core.store.leases().items()
            ] + [_holding(h, now) for h in core.store.coordination_status()[0]]

        try:
            held = asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout)
        except RuntimeError:  # the loop closed meanwhile
            return []
        held.sort(key=lambda item: item["since"])
        return held

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """Holders, waiters and sessions right now: what ``corral status`` shows.

        Read on the broker's own thread (a consistent snapshot); empty lists when the
        broker is not running.
        """
        loop, core = self._loop, self._core
        empty: dict[str, Any] = {"holders": [], "waiters": [], "sessions": [], "time": time.time()}
        if loop is None or core is None or self._finished.is_set():
            return empty

        async def snapshot() -> dict[str, Any]:
            return core.status()

        try:
            return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout)
        except RuntimeError:  # the loop closed meanwhile
            return empty

    def __repr__(self) -> str:
        state = f"running at {self._path!r}" if self.running else "stopped"
        secret = " secret=***" if self._secret is not None else ""
        return f"<Broker {state}{secret}>"

    # ------------------------------------------------------------------ socket file

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.socket_path is None:
                self._path, self._inode, self._private_dir = bind_private(sock)
            else:
                self._path, self._inode = bind_at(sock, os.path.abspath(self.socket_path))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._remove_files()
            raise
        return sock

    def _remove_files(self) -> None:
        if self._path is not None:
            cleanup_files(self._path, self._inode, self._private_dir)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        self._path = None
        self._private_dir = None
        self._inode = 0

    def _export_env(self) -> None:
        assert self._path is not None
        self._env_saved = {
            "EPHEMERAL_PIPE": os.environ.get("EPHEMERAL_PIPE"),
            "EPHEMERAL_SECRET": os.environ.get("EPHEMERAL_SECRET"),
        }
        os.environ["EPHEMERAL_PIPE"] = self._path
        if self._secret is not None:
            os.environ["EPHEMERAL_SECRET"] = self._secret.decode("utf-8", "surrogateescape")
        path, inode, private_dir = self._path, self._inode, self._private_dir

        def cleanup() -> None:  # a process that exits without stop() leaves no files
            cleanup_files(path, inode, private_dir)

        self._atexit = cleanup
        atexit.register(cleanup)

    def _restore_env(self) -> None:
        ours = {"EPHEMERAL_PIPE": self._path}
        if self._secret is not None:
            ours["EPHEMERAL_SECRET"] = self._secret.decode("utf-8", "surrogateescape")
        for name, value in ours.items():
            if os.environ.get(name) != value:
                continue  # someone else set it since: leave theirs
            previous = self._env_saved.get(name)
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
        self._env_saved = {}

    # ------------------------------------------------------------------ loop thread

    def _core_or_raise(self) -> Core:
        if self._core is None:
            raise RuntimeError("broker is not running")
        return self._core

    def _serve(
        self, sock: socket.socket, ready: threading.Event, failure: list[BaseException]
    ) -> None:
        selector = SpinningSelector(self.spin)
        self._selector = selector
        loop = asyncio.SelectorEventLoop(selector)
        self._loop = loop
        try:
            loop.run_until_complete(self._main(sock, ready, failure))
        except BaseException as exc:  # pragma: no cover - reported, never swallowed silently
            log.exception("broker loop crashed")
            if not ready.is_set():
                failure.append(exc)
        finally:
            ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None
            self._finished.set()

    async def _main(
        self, sock: socket.socket, ready: threading.Event, failure: list[BaseException]
    ) -> None:
        loop = asyncio.get_running_loop()
        store = Store(
            time.monotonic,
            wall=time.time,
            require_ttl=self.require_ttl,
            default_ttl=self.default_ttl,
            max_items=self.max_items,
            max_value_size=self.max_value_size,
            tombstone_ttl=self.sweep_interval,
            max_bytes=self.max_bytes,
        )
        self._core = Core(
            store,
            secret=self._secret,
            legacy_hmac=self.legacy_hmac,
            instance=self.instance,
            make_nonce=lambda: secrets.token_hex(16),
            facts=self._facts,
        )
        self._stop_event = asyncio.Event()
        self._drain = self.drain_timeout
        try:
            # backlog= again: create_unix_server(sock=...) calls listen() itself, with
            # asyncio's default of 100 unless told.
            server = await loop.create_unix_server(
                lambda: Connection(self), sock=sock, backlog=BACKLOG
            )
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            sock.close()
            return
        self._started_at = self._last_activity = time.monotonic()
        self._periodic["sweep"] = loop.call_later(self.sweep_interval, self._sweep)
        if self.idle_timeout is not None:
            self._periodic["idle"] = loop.call_later(self.idle_timeout, self._check_idle)
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            for handle in self._periodic.values():
                handle.cancel()
            self._periodic.clear()
            await self._shutdown(server)

    def _request_stop(self, drain: float) -> None:
        self._drain = drain
        if self._stop_event is not None:
            self._stop_event.set()

    async def _shutdown(self, server: asyncio.Server) -> None:
        core = self._core_or_raise()
        core.draining = True
        server.close()
        # One turn of the loop answers ("draining") whatever already sits in socket buffers.
        await asyncio.sleep(0)
        core.store.clear()  # waiting tickets get "draining" before their connection closes
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()  # flushes what was written, then closes
        deadline = time.monotonic() + self._drain
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.abort()  # a client that never reads cannot hold up stop()
        await asyncio.sleep(0)
        self._connections.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        self._core = None

    def _facts(self) -> dict[str, Any]:
        pending = sum(conn.waiting is not None for conn in self._connections.values())
        return {
            "uptime_ms": round((time.monotonic() - self._started_at) * 1000),
            "connections": len(self._connections),
            "rss": _rss_bytes(),
            "in_flight": pending,
        }

    def _after_batch(self) -> None:
        """Keep one timer armed at the store's next deadline (the one deadline heap)."""
        core = self._core
        if core is None:
            return
        heap = core.store._heap  # next_deadline(), inlined: this runs after every batch
        if not heap:
            return
        deadline = heap[0][0]
        if self._timer_at is not None and deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        assert loop is not None
        # loop.time() is time.monotonic(), the store's clock.
        self._timer = loop.call_at(deadline, self._on_deadline)
        self._timer_at = deadline

    def _on_deadline(self) -> None:
        self._timer = self._timer_at = None
        core = self._core
        if core is None:
            return
        expired = core.store.expire_due()
        if expired:
            log.debug("expired %d keys/leases", expired)
        self._after_batch()

    def _sweep(self) -> None:
        core = self._core
        if core is None or self._loop is None:
            return
        core.store.expire_due()
        core.store.compact()
        core.store.prune_waiters()
        self._after_batch()
        self._periodic["sweep"] = self._loop.call_later(self.sweep_interval, self._sweep)

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        assert self._loop is not None
        idle_for = time.monotonic() - self._last_activity
        if not self._connections and idle_for >= self.idle_timeout:
            log.info("no activity for %.1f s: stopping (idle_timeout)", idle_for)
            self._request_stop(self.drain_timeout)
            return
        wait = self.idle_timeout - idle_for if not self._connections else self.idle_timeout
        self._periodic["idle"] = self._loop.call_later(max(wait, 0.05), self._check_idle)


def _enable_debug_logging() -> None:
    logger = logging.getLogger("corral")
    logger.setLevel(logging.DEBUG)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def _holding(entry: dict[str, Any], now: float) -> dict[str, Any]:
    """A lock/pool/once entry of the status dump in :meth:`Broker.holdings`' shape."""
    who = entry.get("who") or {}
    ttl_left = entry.get("ttl_left")
    return {
        "kind": entry["kind"],
        "key": entry["name"],
        "holder": who.get("worker") or (f"pid {who['pid']}" if who.get("pid") else None),
        "value": entry.get("token") if entry["kind"] == "lock" else entry.get("value"),
        "since": entry["since"],
        "expires": None if ttl_left is None else now + ttl_left,
        "connection": who.get("session") if entry.get("owned") else None,
    }
