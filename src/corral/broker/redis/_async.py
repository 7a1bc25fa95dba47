"""The asyncio Redis client: executes the flows of :mod:`corral.broker.redis._flows`.

A heartbeat task keeps its session alive; waits block in BLPOP on a second connection pool.
The blocking client, ``_sync.py``, is generated from ``_async.py`` by tools/async_to_sync.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from corral._lifecycle import AsyncClosing
from corral._twins import ASYNC
from corral.broker._api_async import AsyncOnceAPI
from corral.broker._flows import MISSING
from corral.broker.redis import _flows as flows
from corral.broker.redis._base import (
    RedisBase,
    T,
    health,
    import_redis,
    log,
    lost,
    mapped,
    metrics,
    redact,
)
from corral.broker.redis._scripts import scripts
from corral.broker.redis._session import AsyncSession
from corral.errors import BrokerError, BrokerRequestError, BrokerUnavailable

if TYPE_CHECKING:
    import redis as redis_py

__all__ = ["AsyncRedisClient"]


class AsyncRedisClient(RedisBase, AsyncOnceAPI, AsyncClosing):
    """An asyncio client of a corral run on Redis: the full broker client API, awaitable.

    :param url: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS) or
        ``unix:///path/redis.sock``; default ``$CORRAL_BROKER_URL``.
    :param secret: the Redis password when the URL carries none.
    :param timeout: seconds to wait for each answer (and to connect).
    :param run_id: the run's name, shared by every machine of the run; default
        ``$CORRAL_RUN_ID``. Keys live under ``corral:{RUN_ID}:``.
    :param session_ttl: seconds after which a client that stopped heartbeating (killed,
        frozen) loses what it holds; the heartbeat runs every ``session_ttl / 3``.
        Default ``$CORRAL_SESSION_TTL``, else 5.
    :param default_ttl: TTL of keys and leases set without one (the broker's 30 minutes).
    :param worker_id: shown by :meth:`status`; default ``$PYTEST_XDIST_WORKER``.
    :param compress_threshold: accepted for parity with :class:`~corral.broker.Client`;
        Redis stores values as plain JSON.
    :param spin: accepted for parity with :class:`~corral.broker.Client` (whose polling
        only pays for a broker on this machine); ignored: answers come over the network.
    :raises ValueError: no Redis URL or no run id.

    ``AsyncClient(...)`` returns this client when ``$CORRAL_BROKER_URL`` is set, so it takes
    every argument ``AsyncClient`` takes. ``once`` accepts an async *compute*; ``lock`` and
    ``acquire`` are ``async with``; the heartbeat is a task on the loop of first use: use
    one client per event loop.
    """

    def __init__(
        self,
        url: str | None = None,
        secret: str | bytes | None = None,
        timeout: float = 5.0,
        *,
        run_id: str | None = None,
        session_ttl: float | None = None,
        default_ttl: float = 1800.0,
        worker_id: str | None = None,
        compress_threshold: int | None = None,
        spin: float | None = None,
    ) -> None:
        super().__init__(url, secret, timeout, run_id, session_ttl, default_ttl, worker_id)
        redis = import_redis()
        self._redis_error: type[Exception] = redis.RedisError
        connect = redis.asyncio.Redis.from_url
        self._r: redis_py.asyncio.Redis = connect(self.url, **self._options(False))
        self._rb: redis_py.asyncio.Redis = connect(self.url, **self._options(True))
        self._scripts = {name: self._r.register_script(src) for name, src in scripts().items()}
        self._session = AsyncSession(self._beat, self.session_ttl)
        if not ASYNC:
            import weakref

            # Ends the session at interpreter exit too, so a worker that forgot close()
            # frees its claims at once instead of after session_ttl.
            self._finalizer = weakref.finalize(self, self._session.end)

    # ------------------------------------------------------------------ key/value

    async def ping(self) -> float:
        """Round-trip latency to Redis, in milliseconds."""
        started = time.perf_counter()
        await self._call(lambda: self._r.ping())
        return (time.perf_counter() - started) * 1000.0

    async def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default* when it is missing or expired.

        :raises KeyNotFound: no *default* and the key never existed or expired.
        """
        return await self._run(flows.get(self.prefix, key, default))

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value under *key* for *ttl* seconds (``default_ttl`` if None).

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises InvalidTTL: *ttl* is not a positive number.
        """
        await self._run(flows.set_(key, value, ttl, self._default_ms))

    async def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if it is absent, atomically; True when this call set it."""
        return bool(await self._run(flows.set_(key, value, ttl, self._default_ms, nx=True)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (created at 0) and return the result.

        A new counter gets *ttl* or ``default_ttl``; an existing one keeps its TTL unless
        *ttl* is given. :raises InvalidRequest: the value is not an integer.
        """
        return int(await self._run(flows.incr(key, amount, ttl, self._default_ms)))

    async def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return bool(await self._run(flows.delete(key)))

    async def keys(self) -> list[str]:
        """The run's live keys."""
        return list(await self._run(flows.keys()))

    # ------------------------------------------------------------------ leases

    async def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id* (renews its own).

        Freed by :meth:`release`, when its TTL passes, or when this client's session ends.

        :raises LeaseError: *worker_id* already leases under another key.
        """
        return int(
            await self._owned(
                lambda sid: flows.lease(sid, key, worker_id, ttl, self._default_ms),
            )
        )

    async def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return bool(await self._run(flows.release(worker_id)))

    # ------------------------------------------------------------------ coordination

    async def _once(
        self, key: str, compute: Callable[[], Any], ttl: float | None, timeout: float | None
    ) -> Any:
        result = await self._owned(
            lambda sid: flows.once_begin(self.prefix, sid, self._tid(sid), key, timeout)
        )
        if not isinstance(result, flows.Claim):
            return result
        try:
            value = compute()
            if ASYNC and inspect.isawaitable(value):
                value = await value
            return await self._run(flows.once_done(result, value, ttl, self._default_ms))
        except Exception as exc:
            await self._run(flows.once_fail(result, exc, ttl, self._default_ms))
            raise
        except BaseException:  # Ctrl-C: not a failure of compute; let another caller try
            with contextlib.suppress(BrokerError):
                await asyncio.shield(self._execute(flows.give_up(result)))
            raise

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[int]:
        """``with client.lock(name) as token:`` run-wide mutual exclusion, FIFO-fair.

        :param ttl: free the lock after this many seconds even if still held (a safety net
            for a holder that hangs); None: held until released or the session ends.
        :param timeout: give up waiting after this many seconds (0: do not wait).
        :returns: a context manager yielding the fencing token (increasing per name).
        :raises BrokerTimeout: not acquired within *timeout*.
        :raises ClaimLost: on exit, when the lock had already been freed (TTL, session).
        """
        return self._hold("lock", name, ttl, timeout)

    async def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* of JSON *items* (idempotent); True when this call created it.

        :raises PoolConflict: it was declared before with different items.
        """
        return bool(await self._run(flows.pool(name, items)))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractAsyncContextManager[Any]:
        """``with client.acquire(name) as item:`` take a free item of a pool, FIFO-fair.

        :raises KeyNotFound: the pool was never declared.
        :raises BrokerTimeout: no item freed up within *timeout*.
        :raises ClaimLost: on exit, when the item had already been freed (TTL, session).
        """
        return self._hold("pool", name, ttl, timeout)

    async def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Block until the run-wide rate of *rate* calls per *per* seconds allows a call.

        Calls are served in arrival order: each reserves the next free slot in Redis
        and sleeps until it starts.

        :raises BrokerTimeout: the next slot starts later than *timeout* seconds from now
            (nothing is reserved then).
        """
        await self._run(flows.throttle(name, rate, per, timeout))

    async def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait until *parties* callers reached barrier *name*; returns this arrival's index.

        The barrier is reusable (the next *parties* callers form the next round). If a
        waiting member dies or times out, it is broken for every member, for good.

        :raises BarrierBroken: a member died or timed out.
        :raises BrokerTimeout: the others did not arrive within *timeout* (this breaks it).
        """
        return int(
            await self._owned(
                lambda sid: flows.barrier(self.prefix, sid, self._tid(sid), name, parties, timeout)
            )
        )

    async def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; returns its new length."""
        return int(await self._run(flows.push(queue, items)))

    async def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting for one up to *timeout* seconds.

        A reliable queue: the item moves into this client's in-flight list in Redis and
        is removed from there only once it has reached this process. A pop that fails
        before that (a Ctrl-C, a lost connection) puts the item back at the head of the
        queue; so does the end of this client's session (``close()``, or ``session_ttl``
        after the process died). While poppers live, every item is returned by exactly
        one call. Delivery is *at least once*: an item is never lost when a popper
        crashes, but one can be returned twice when a popper's session expired while it
        was paused in the middle of a pop. An item is not returned again once ``pop`` has
        returned it, even if the caller then dies: requeue unfinished work yourself.

        :raises BrokerTimeout: the queue stayed empty.
        """
        return await self._owned(
            lambda sid: flows.pop(self.prefix, sid, self._tid(sid), queue, timeout),
        )

    # ------------------------------------------------------------------ observability

    async def status(self) -> dict[str, Any]:
        """Holders, waiters and sessions of the run: what, who, since when, TTL left.

        ``{"holders": [...], "waiters": [...], "sessions": [...], "time": EPOCH_S}``; each
        entry has ``kind``, ``name``, ``who`` (``pid``, ``host``, ``worker``, ``session``),
        ``since`` (epoch seconds) and, for holders, ``ttl_left`` (seconds or None).
        """
        return dict(await self._run(flows.status()))

    async def stats(self) -> dict[str, Any]:
        """Counts for the run: items, leases, sessions, holders, waiters."""
        return dict(await self._run(flows.stats()))

    async def health(self) -> dict[str, Any]:
        """``status`` (``healthy``), Redis version and uptime, and the ping latency."""
        latency = await self.ping()
        info = await self._call(lambda: self._r.info("server"))
        return health(info, latency)

    async def metrics(self) -> str:
        """Prometheus text with the run's counts (the socket broker's ``corral_broker_*``)."""
        return metrics(await self.stats(), self.run_id)

    async def purge(self) -> int:
        """Delete every key of this run (end of a CI pipeline); returns how many.

        Do not call it while other clients of the run still work.
        """

        async def collect() -> list[str]:
            found = []
            async for key in self._r.scan_iter(match=self.prefix + "*", count=500):
                found.append(key)
            return found

        keys = await self._call(collect)
        deleted = 0
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            deleted += int(await self._call(lambda: self._r.unlink(*chunk)))  # noqa: B023
        return deleted

    async def join(self) -> None:
        """Register this client's session now (the first claim does it otherwise), so the
        run counts this process as working until :meth:`close`: while it lives, another
        client's :meth:`purge_if_last` leaves the run's keys alone."""
        await self._session.current()

    async def purge_if_last(self) -> int | None:
        """Delete every key of this run if no other client of it has a live session.

        One script decides and deletes, so two clients finishing together cannot both
        leave the keys, nor delete them under a client that is still working. Sessions
        that expired (killed processes) do not count. This client's session ends either
        way; a later claim starts a new one. Sessions are what a run knows of its
        clients: call :meth:`join` at the start of each process that must keep the run.

        :returns: how many keys were deleted, or None when other clients still live
            (nothing was deleted; the keys expire by themselves otherwise).
        """
        if self._closed:
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({redact(self.url)})")
        return await self._run(flows.purge_last(await self._session.detach()))

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> AsyncRedisClient:
        """Check now that Redis answers (instead of on the first request)."""
        await self.ping()
        return self

    async def aclose(self) -> None:
        """End the session (everything it holds is released at once), close. Idempotent."""
        if self._closed:
            return
        if ASYNC:
            await self._session.end()
        else:
            self._finalizer()
        self._closed = True
        for connection in (self._r, self._rb):
            if ASYNC:
                # aclose() since redis-py 5.0.1; close() (deprecated since) before it.
                await (getattr(connection, "aclose", None) or connection.close)()
            else:
                connection.close()

    # ------------------------------------------------------------------ driver

    async def _beat(self, sid: str, mode: str) -> Any:
        return await self._execute(flows.Script("session", self._session_args(sid, mode)))

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({redact(self.url)})")
        try:
            return await fn()
        except self._redis_error as exc:
            if self._closed:  # close() elsewhere pulled the connection away
                raise BrokerUnavailable(
                    f"this AsyncRedisClient was closed ({redact(self.url)})"
                ) from exc
            raise mapped(exc, self.url) from exc
        except Exception as exc:
            if self._closed:  # redis-py can trip over a connection closed under it
                raise BrokerUnavailable(
                    f"this AsyncRedisClient was closed ({redact(self.url)})"
                ) from exc
            raise

    async def _execute(self, op: flows.Op) -> Any:
        if isinstance(op, flows.Script):
            script = self._scripts[op.name]
            try:
                return await self._call(
                    lambda: script(keys=[self.prefix], args=op.args, client=self._r),
                )
            except BaseException:
                # Interrupted (Ctrl-C, a lost connection) with the outcome unknown: the
                # script may have queued a ticket or granted a claim nobody would take.
                if op.cancel is not None:
                    with contextlib.suppress(BrokerError):
                        await asyncio.shield(self._execute(op.cancel))
                raise
        if isinstance(op, flows.Command):
            command = self._r.execute_command
            return await self._call(lambda: command(*op.args))  # type: ignore[no-untyped-call]
        if isinstance(op, flows.Wait):
            into = op.into
            try:
                if into is not None:
                    # Fractional seconds are fine (Redis >= 6); redis-py types it int.
                    move = self._rb.blmove
                    return await self._call(lambda: move(op.key, into, op.timeout))  # type: ignore[arg-type]
                reply = await self._call(lambda: self._rb.blpop([op.key], timeout=op.timeout))
            except BaseException:
                if op.cancel is not None:  # interrupted: never leave a grant behind
                    with contextlib.suppress(BrokerError):
                        await asyncio.shield(self._execute(op.cancel))
                raise
            return None if reply is None else reply[1]
        await asyncio.sleep(op.seconds)
        return None

    async def _run(self, flow: Generator[flows.Op, Any, T]) -> T:
        if self._closed:
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({redact(self.url)})")
        try:
            op = next(flow)
            while True:
                op = flow.send(await self._execute(op))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _owned(self, build: Callable[[str], Generator[flows.Op, Any, T]]) -> T:
        """Run the flow *build(sid)* that takes claims for this client's session; if Redis
        says the session expired meanwhile, run it once more under a new session."""
        sid = await self._session.current()
        try:
            return await self._run(build(sid))
        except BrokerRequestError as exc:
            if exc.code != "session_lost":
                raise
        return await self._run(build(await self._session.renew(sid)))

    @contextlib.asynccontextmanager
    async def _hold(
        self, kind: str, name: str, ttl: float | None, timeout: float | None
    ) -> AsyncIterator[Any]:
        grant: flows.Grant = await self._owned(
            lambda sid: flows.acquire(self.prefix, sid, self._tid(sid), kind, name, ttl, timeout)
        )
        try:
            yield grant.token if kind == "lock" else grant.value
        except BaseException:
            try:
                released = await asyncio.shield(self._run(flows.unhold(grant)))
            except BrokerError as exc:
                if not self._closed:  # closing ended the session, which freed it
                    log.warning("could not release %s %r: %s", kind, name, exc)
            else:
                if not released:
                    log.warning("%s %r was already freed when its holder failed", kind, name)
            raise
        if not await self._run(flows.unhold(grant)):
            raise lost(grant)
