"""The asyncio Redis client: the same flows as the blocking one, awaited.

A task keeps its session alive; use one client per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

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


class AsyncRedisClient(RedisBase):
    """The asyncio twin of :class:`RedisClient` (same methods, awaitable; ``aclose()``).

    ``once`` accepts an async *compute*; ``lock``/``acquire`` are ``async with``.
    The heartbeat is a task on the loop of first use: use one client per event loop.
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
    ) -> None:
        super().__init__(url, secret, timeout, run_id, session_ttl, default_ttl, worker_id)
        redis = import_redis()
        self._redis_error: type[Exception] = redis.RedisError
        self._r: redis_py.asyncio.Redis = redis.asyncio.Redis.from_url(
            self.url, **self._options(False)
        )
        self._rb: redis_py.asyncio.Redis = redis.asyncio.Redis.from_url(
            self.url, **self._options(True)
        )
        self._scripts = {name: self._r.register_script(src) for name, src in scripts().items()}
        self._session = AsyncSession(self._beat, self.session_ttl)

    async def ping(self) -> float:
        """Round-trip latency to Redis, in milliseconds."""
        started = time.perf_counter()
        await self._call(self._r.ping())
        return (time.perf_counter() - started) * 1000.0

    async def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default*. :raises KeyNotFound: missing or expired."""
        return await self._run(flows.get(self.prefix, key, default))

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value. :raises TypeError: not JSON (nothing was sent)."""
        await self._run(flows.set_(key, value, ttl, self._default_ms))

    async def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if absent, atomically; True when this call set it."""
        return bool(await self._run(flows.set_(key, value, ttl, self._default_ms, nx=True)))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomic counter, created at 0."""
        return int(await self._run(flows.incr(key, amount, ttl, self._default_ms)))

    async def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return bool(await self._run(flows.delete(key)))

    async def keys(self) -> list[str]:
        """The run's live keys."""
        return list(await self._run(flows.keys()))

    async def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id*."""
        return int(
            await self._owned(lambda sid: flows.lease(sid, key, worker_id, ttl, self._default_ms))
        )

    async def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return bool(await self._run(flows.release(worker_id)))

    async def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Exactly one caller in the run computes *key*; *compute* may be async."""
        if not callable(compute):
            raise TypeError("compute must be callable")
        result = await self._owned(
            lambda sid: flows.once_begin(self.prefix, sid, self._tid(sid), key, timeout)
        )
        if not isinstance(result, flows.Claim):
            return result
        try:
            value = compute()
            if inspect.isawaitable(value):
                value = await value
            return await self._run(flows.once_done(result, value, ttl, self._default_ms))
        except Exception as exc:
            await self._run(flows.once_fail(result, exc, ttl, self._default_ms))
            raise
        except BaseException:
            with contextlib.suppress(BrokerError):
                await asyncio.shield(self._execute(flows.give_up(result)))
            raise

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[int]:
        """``async with client.lock(name) as token:`` run-wide FIFO mutual exclusion."""
        return self._hold("lock", name, ttl, timeout)

    async def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* (idempotent). :raises PoolConflict: other items before."""
        return bool(await self._run(flows.pool(name, items)))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractAsyncContextManager[Any]:
        """``async with client.acquire(name) as item:`` a free pool item, FIFO-fair."""
        return self._hold("pool", name, ttl, timeout)

    async def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Wait until the run-wide rate allows a call."""
        await self._run(flows.throttle(name, rate, per, timeout))

    async def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait for *parties* callers. :raises BarrierBroken: a member died or timed out."""
        return int(
            await self._owned(
                lambda sid: flows.barrier(self.prefix, sid, self._tid(sid), name, parties, timeout)
            )
        )

    async def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; returns its new length."""
        return int(await self._run(flows.push(queue, items)))

    async def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting up to *timeout* seconds.

        Cancellation-safe: a pop cancelled at any point, even as Redis hands it the item,
        leaves the item at the head of the queue. Delivery is at least once across a
        crash of the popper (see :meth:`RedisClient.pop`).
        """
        return await self._owned(
            lambda sid: flows.pop(self.prefix, sid, self._tid(sid), queue, timeout)
        )

    async def status(self) -> dict[str, Any]:
        """Holders, waiters and sessions of the run (see :meth:`RedisClient.status`)."""
        return dict(await self._run(flows.status()))

    async def stats(self) -> dict[str, Any]:
        """Counts for the run: items, leases, sessions, holders, waiters."""
        return dict(await self._run(flows.stats()))

    async def health(self) -> dict[str, Any]:
        """``status``, Redis version and uptime, ping latency."""
        latency = await self.ping()
        info = await self._call(self._r.info("server"))
        return health(info, latency)

    async def metrics(self) -> str:
        """Prometheus text with the run's counts."""
        return metrics(await self.stats(), self.run_id)

    async def purge(self) -> int:
        """Delete every key of this run; returns how many."""

        async def collect() -> list[str]:
            return [key async for key in self._r.scan_iter(match=self.prefix + "*", count=500)]

        keys: list[str] = await self._call(collect())
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += int(await self._call(self._r.unlink(*keys[start : start + 500])))
        return deleted

    async def join(self) -> None:
        """Register this client's session now (see :meth:`RedisClient.join`)."""
        await self._session.current()

    async def purge_if_last(self) -> int | None:
        """Delete the run's keys if no other client has a live session; None otherwise
        (see :meth:`RedisClient.purge_if_last`). Ends this client's session."""
        if self._closed:
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({redact(self.url)})")
        return await self._run(flows.purge_last(await self._session.detach()))

    async def connect(self) -> AsyncRedisClient:
        """Check now that Redis answers."""
        await self.ping()
        return self

    async def aclose(self) -> None:
        """End the session (releasing what it holds at once) and close. Idempotent."""
        if self._closed:
            return
        await self._session.end()
        self._closed = True
        for connection in (self._r, self._rb):
            # aclose() since redis-py 5.0.1; close() (deprecated since) before it.
            closer = getattr(connection, "aclose", None) or connection.close
            await closer()

    async def __aenter__(self) -> AsyncRedisClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ driver

    async def _beat(self, sid: str, mode: str) -> Any:
        return await self._execute(flows.Script("session", self._session_args(sid, mode)))

    async def _call(self, awaitable: Any) -> Any:
        if self._closed:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never awaited: no "coroutine was never awaited" warning
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({redact(self.url)})")
        try:
            return await awaitable
        except self._redis_error as exc:
            if self._closed:  # aclose() in another task pulled the connection away
                raise BrokerUnavailable(self._closed_message()) from exc
            raise mapped(exc, self.url) from exc
        except Exception as exc:
            if self._closed:  # redis-py can trip over a connection closed under it
                raise BrokerUnavailable(self._closed_message()) from exc
            raise

    def _closed_message(self) -> str:
        return f"this AsyncRedisClient was closed ({redact(self.url)})"

    async def _execute(self, op: flows.Op) -> Any:
        if isinstance(op, flows.Script):
            script = self._scripts[op.name]
            try:
                return await self._call(script(keys=[self.prefix], args=op.args, client=self._r))
            except BaseException:  # cancelled or lost with the outcome unknown: undo it
                if op.cancel is not None:
                    with contextlib.suppress(BrokerError):
                        await asyncio.shield(self._execute(op.cancel))
                raise
        if isinstance(op, flows.Command):
            return await self._call(self._r.execute_command(*op.args))  # type: ignore[no-untyped-call]
        if isinstance(op, flows.Wait):
            try:
                if op.into is not None:
                    # Fractional seconds are fine (Redis >= 6); redis-py types it int.
                    moved = self._rb.blmove(op.key, op.into, op.timeout)  # type: ignore[arg-type]
                    return await self._call(moved)
                reply = await self._call(self._rb.blpop([op.key], timeout=op.timeout))
            except BaseException:
                if op.cancel is not None:
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
