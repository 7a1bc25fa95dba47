"""Client sessions on Redis: what a client holds dies with its session key.

A session is a member of the run's ``sess`` sorted set whose score is its deadline; a
heartbeat (a thread for the blocking client, a task for the asyncio one) pushes the
deadline forward every ``ttl / 3`` and, in the same script, frees what expired sessions
held. A clean close ends the session at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from corral.broker._address import is_redis_url
from corral.errors import BrokerError, BrokerUnavailable

log = logging.getLogger("corral.broker.redis")

_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def resolve_url(url: str | None) -> str:
    """*url*, else ``$CORRAL_BROKER_URL``; it must be a Redis URL.

    :raises ValueError: neither is a Redis URL.
    """
    value = url if url is not None else os.environ.get("CORRAL_BROKER_URL")
    if not value:
        raise ValueError("no Redis URL: pass url='redis://HOST:6379/0' or set CORRAL_BROKER_URL")
    if not is_redis_url(value):
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {value!r}")
    return value


def resolve_run_id(run_id: str | None) -> str:
    """*run_id*, else ``$CORRAL_RUN_ID``: the name every client of one run shares.

    :raises ValueError: neither is set, or it has characters other than ``A-Za-z0-9._-``.
    """
    value = run_id if run_id is not None else os.environ.get("CORRAL_RUN_ID")
    if not value:
        raise ValueError(
            "no run id: pass run_id= or set CORRAL_RUN_ID to a name all machines of this run "
            "share (e.g. the CI pipeline id), so concurrent runs never collide"
        )
    if not _RUN_ID.fullmatch(value):
        raise ValueError(f"a run id is 1-128 characters of A-Za-z0-9._- only, got {value!r}")
    return value


def prefix_for(run_id: str) -> str:
    """The run's key prefix; the ``{...}`` hash tag keeps a run in one cluster slot."""
    return f"corral:{{{run_id}}}:"


def session_info(worker_id: str | None) -> str:
    worker = worker_id if worker_id is not None else os.environ.get("PYTEST_XDIST_WORKER")
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "worker": worker, "since": time.time()}
    )


def new_sid() -> str:
    return secrets.token_hex(8)


Beat = Callable[[str, str], Any]


class SyncSession:
    """The blocking client's session: registered lazily, kept alive by a daemon thread.

    Fork-aware: a child process gets its own session (the parent's stays the parent's).
    Holds no reference to the client, so a forgotten client can be collected (and its
    finalizer ends the session).
    """

    def __init__(self, beat: Beat, ttl: float) -> None:
        self._beat = beat
        self.interval = ttl / 3
        self._lock = threading.Lock()
        self.sid: str | None = None
        self._pid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended = False

    def current(self) -> str:
        """This process's session id, registering it (and the heartbeat) on first use.

        :raises BrokerUnavailable: the session was ended (the client is closed).
        """
        with self._lock:
            _check_open(self._ended)
            if self.sid is None or self._pid != os.getpid():
                self._register()
            assert self.sid is not None
            return self.sid

    def renew(self, lost: str) -> str:
        """Replace session *lost*, which Redis reports expired, with a new one."""
        with self._lock:
            _check_open(self._ended)
            if self.sid == lost or self.sid is None or self._pid != os.getpid():
                _warn_lost(lost)
                self._register()
            assert self.sid is not None
            return self.sid

    def _register(self) -> None:
        sid = new_sid()
        self._beat(sid, "register")
        self.sid, self._pid = sid, os.getpid()
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stop.is_set():
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="corral-redis-heartbeat", daemon=True
            )
            self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            with self._lock:
                sid = self.sid
                if sid is None or stop.is_set() or self._pid != os.getpid():
                    return
                try:
                    reply = self._beat(sid, "beat")
                    if reply and reply[0] == "lost":
                        _warn_lost(sid)
                        self._register()
                except BrokerError as exc:
                    log.warning("Redis heartbeat failed (%s); retrying", exc)

    def detach(self) -> str | None:
        """Stop the heartbeat and forget the session without ending it in Redis (the
        caller ends it, in a script of its own); a later claim registers a new one."""
        with self._lock:
            sid, self.sid = self.sid, None
            self._stop.set()
            thread, self._thread = self._thread, None
            mine = self._pid == os.getpid()
        if thread is not None and thread is not threading.current_thread() and mine:
            thread.join(timeout=5)
        return sid if mine else None

    def end(self) -> None:
        """Stop the heartbeat and free everything the session holds. Idempotent."""
        with self._lock:
            sid, self.sid = self.sid, None
            self._ended = True
            self._stop.set()
            thread, self._thread = self._thread, None
            mine = self._pid == os.getpid()
        if thread is not None and thread is not threading.current_thread() and mine:
            thread.join(timeout=5)
        if sid is not None and mine:
            try:
                self._beat(sid, "end")
            except BrokerError as exc:
                log.warning("could not end Redis session %s (%s); it expires by itself", sid, exc)


def _check_open(ended: bool) -> None:
    if ended:
        raise BrokerUnavailable("this Redis client is closed: its session was ended")


def _warn_lost(sid: str) -> None:
    # Paused past its TTL (debugger, GC, suspended VM, starved heartbeat): everything it
    # held was freed and may be held by others now. It carries on as a new session.
    log.warning(
        "this client's Redis session %s expired; its locks, pool items, leases and once "
        "claims were released. Raise session_ttl (CORRAL_SESSION_TTL) if the process pauses.",
        sid,
    )


AsyncBeat = Callable[[str, str], Awaitable[Any]]


class AsyncSession:
    """The asyncio client's session: registered lazily, kept alive by a task."""

    def __init__(self, beat: AsyncBeat, ttl: float) -> None:
        self._beat = beat
        self.interval = ttl / 3
        self._lock: asyncio.Lock | None = None
        self.sid: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def current(self) -> str:
        async with self._get_lock():
            _check_open(self._ended)
            if self.sid is None:
                await self._register()
            assert self.sid is not None
            return self.sid

    async def renew(self, lost: str) -> str:
        """Replace session *lost*, which Redis reports expired, with a new one."""
        async with self._get_lock():
            _check_open(self._ended)
            if self.sid == lost or self.sid is None:
                _warn_lost(lost)
                await self._register()
            assert self.sid is not None
            return self.sid

    async def _register(self) -> None:
        sid = new_sid()
        await self._beat(sid, "register")
        self.sid = sid
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="corral-redis-heartbeat"
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            sid = self.sid
            if sid is None:
                return
            try:
                reply = await self._beat(sid, "beat")
                if reply and reply[0] == "lost":
                    async with self._get_lock():
                        if self.sid == sid:
                            _warn_lost(sid)
                            await self._register()
            except BrokerError as exc:
                log.warning("Redis heartbeat failed (%s); retrying", exc)

    async def detach(self) -> str | None:
        """Stop the heartbeat and forget the session without ending it in Redis."""
        async with self._get_lock():
            sid, self.sid = self.sid, None
            task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return sid

    async def end(self) -> None:
        sid, self.sid = self.sid, None
        self._ended = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sid is not None:
            try:
                await self._beat(sid, "end")
            except BrokerError as exc:
                log.warning("could not end Redis session %s (%s); it expires by itself", sid, exc)
