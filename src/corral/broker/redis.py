"""The broker client API on Redis, for runs that span machines: RedisClient, AsyncRedisClient.

Same methods as :class:`~corral.broker.Client` plus the coordination of issue 5, with keys
under a run-scoped prefix and ownership tied to a heartbeated session. The operations are
the flows of :mod:`corral.broker._redis_flows`; these classes only execute them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from itertools import count
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from corral.broker import _redis_flows as flows
from corral.broker._flows import MISSING
from corral.broker._redis_scripts import scripts
from corral.broker._redis_session import (
    AsyncSession,
    SyncSession,
    is_redis_url,
    prefix_for,
    resolve_run_id,
    resolve_url,
    session_info,
)
from corral.errors import (
    AuthFailed,
    BrokerError,
    BrokerRequestError,
    BrokerTimeout,
    BrokerUnavailable,
    ClaimLost,
    error_from_code,
)

if TYPE_CHECKING:
    import redis as redis_py

__all__ = ["AsyncRedisClient", "RedisClient", "is_redis_url"]

log = logging.getLogger("corral.broker.redis")
T = TypeVar("T")

#: Seconds a killed or frozen client keeps its claims (``$CORRAL_SESSION_TTL`` overrides).
DEFAULT_SESSION_TTL = 5.0


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - redis is a dev dependency
        raise ImportError("the Redis backend needs redis-py: pip install 'corral[redis]'") from exc
    return redis


def _mapped(exc: Exception, url: str) -> BrokerError:
    """The corral error for a redis-py exception (the one place they are mapped)."""
    import redis.exceptions as rex

    where = _redact(url)
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return AuthFailed(f"auth_failed: Redis at {where} refused the credentials: {exc}")
    if isinstance(exc, rex.TimeoutError):
        return BrokerTimeout(f"no answer from Redis at {where} in time: {exc}")
    if isinstance(exc, rex.ConnectionError):
        return BrokerUnavailable(
            f"cannot reach Redis at {where}: {exc}. Is it running, and is the URL right?"
        )
    if isinstance(exc, rex.ResponseError):
        return BrokerRequestError(f"Redis at {where} refused: {exc}", code="redis_error")
    return BrokerError(f"Redis at {where} failed: {exc}")


def _redact(url: str) -> str:
    """*url* without its password, for messages and reprs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


class _Base:
    """Configuration shared by both clients (no I/O here)."""

    def __init__(
        self,
        url: str | None,
        secret: str | bytes | None,
        timeout: float,
        run_id: str | None,
        session_ttl: float | None,
        default_ttl: float,
        worker_id: str | None,
    ) -> None:
        if session_ttl is None:
            session_ttl = float(os.environ.get("CORRAL_SESSION_TTL") or DEFAULT_SESSION_TTL)
        self.url = resolve_url(url)
        self.run_id = resolve_run_id(run_id)
        self.prefix = prefix_for(self.run_id)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if not session_ttl > 0:
            raise ValueError(f"session_ttl must be positive, got {session_ttl!r}")
        if not default_ttl > 0:
            raise ValueError(f"default_ttl must be positive, got {default_ttl!r}")
        self.timeout = float(timeout)
        self.session_ttl = float(session_ttl)
        self.default_ttl = float(default_ttl)
        self._default_ms = flows.ttl_ms(default_ttl, 0)
        self._password = secret.decode() if isinstance(secret, bytes) else secret
        self.worker_id = worker_id
        self._tickets = count()
        self._closed = False

    def _options(self, blocking: bool) -> dict[str, Any]:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": self.timeout,
            # A blocking pop waits up to WAIT_SLICE seconds inside Redis.
            "socket_timeout": self.timeout + (flows.WAIT_SLICE if blocking else 0.0),
        }
        if not self.url.startswith("unix://"):  # a partition must not hang a wait forever
            options["socket_keepalive"] = True
        if self._password is not None:
            options["password"] = self._password  # the URL's own password wins
        return options

    def _tid(self, sid: str) -> str:
        return f"{sid}.{os.getpid()}.{next(self._tickets)}"

    def _session_args(self, sid: str, mode: str) -> list[Any]:
        # Who registers is read now, not at __init__: a forked child is its own pid.
        info = session_info(self.worker_id) if mode == "register" else ""
        return [sid, flows.ttl_ms(self.session_ttl, 0), mode, info]

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {_redact(self.url)} run={self.run_id!r} {state}>"


class RedisClient(_Base):
    """A blocking client of a corral run on Redis: the full broker client API.

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
    :raises ValueError: no Redis URL or no run id.

    Thread-safe (one session per process, shared by its threads) and fork-aware (a child
    gets its own session).
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
        redis = _import_redis()
        self._redis_error: type[Exception] = redis.RedisError
        self._r: redis_py.Redis = redis.Redis.from_url(self.url, **self._options(False))
        self._rb: redis_py.Redis = redis.Redis.from_url(self.url, **self._options(True))
        self._scripts = {name: self._r.register_script(src) for name, src in scripts().items()}
        self._session = SyncSession(self._beat, self.session_ttl)
        # Ends the session at interpreter exit too, so a worker that forgot close()
        # frees its claims at once instead of after session_ttl.
        self._finalizer = weakref.finalize(self, self._session.end)

    # ------------------------------------------------------------------ key/value

    def ping(self) -> float:
        """Round-trip latency to Redis, in milliseconds."""
        started = time.perf_counter()
        self._call(lambda: self._r.ping())
        return (time.perf_counter() - started) * 1000.0

    def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default* when it is missing or expired.

        :raises KeyNotFound: no *default* and the key never existed or expired.
        """
        return self._run(flows.get(self.prefix, key, default))

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value under *key* for *ttl* seconds (``default_ttl`` if None).

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises InvalidTTL: *ttl* is not a positive number.
        """
        self._run(flows.set_(key, value, ttl, self._default_ms))

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if it is absent, atomically; True when this call set it."""
        return bool(self._run(flows.set_(key, value, ttl, self._default_ms, nx=True)))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (created at 0) and return the result.

        A new counter gets *ttl* or ``default_ttl``; an existing one keeps its TTL unless
        *ttl* is given. :raises InvalidRequest: the value is not an integer.
        """
        return int(self._run(flows.incr(key, amount, ttl, self._default_ms)))

    def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return bool(self._run(flows.delete(key)))

    def keys(self) -> list[str]:
        """The run's live keys."""
        return list(self._run(flows.keys()))

    # ------------------------------------------------------------------ leases

    def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id* (renews its own).

        Freed by :meth:`release`, when its TTL passes, or when this client's session ends.

        :raises LeaseError: *worker_id* already leases under another key.
        """
        return int(self._owned(lambda sid: flows.lease(sid, key, worker_id, ttl, self._default_ms)))

    def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return bool(self._run(flows.release(worker_id)))

    # ------------------------------------------------------------------ coordination

    def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of *key*, computed by exactly one caller in the whole run.

        The others wait for it (up to *timeout* seconds). The value is stored under *key*
        for *ttl* seconds (``get(key)`` reads it). If *compute* raises, that caller gets
        its exception and every other caller :class:`~corral.errors.OnceFailed` with its
        message; if the computing process dies, one waiter is elected to compute instead.

        :raises OnceFailed: the computing caller's *compute* raised.
        :raises BrokerTimeout: the value was not ready within *timeout*.
        """
        if not callable(compute):
            raise TypeError("compute must be callable")
        result = self._owned(
            lambda sid: flows.once_begin(self.prefix, sid, self._tid(sid), key, timeout)
        )
        if not isinstance(result, flows.Claim):
            return result
        try:
            value = compute()
            return self._run(flows.once_done(result, value, ttl, self._default_ms))
        except Exception as exc:
            self._run(flows.once_fail(result, exc, ttl, self._default_ms))
            raise
        except BaseException:  # Ctrl-C: not a failure of compute; let another caller try
            with contextlib.suppress(BrokerError):
                self._execute(flows.give_up(result))
            raise

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractContextManager[int]:
        """``with client.lock(name) as token:`` run-wide mutual exclusion, FIFO-fair.

        :param ttl: free the lock after this many seconds even if still held (a safety net
            for a holder that hangs); None: held until released or the session ends.
        :param timeout: give up waiting after this many seconds (0: do not wait).
        :returns: a context manager yielding the fencing token (increasing per name).
        :raises BrokerTimeout: not acquired within *timeout*.
        :raises ClaimLost: on exit, when the lock had already been freed (TTL, session).
        """
        return self._hold("lock", name, ttl, timeout)

    def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* of JSON *items* (idempotent); True when this call created it.

        :raises PoolConflict: it was declared before with different items.
        """
        return bool(self._run(flows.pool(name, items)))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractContextManager[Any]:
        """``with client.acquire(name) as item:`` take a free item of a pool, FIFO-fair.

        :raises KeyNotFound: the pool was never declared.
        :raises BrokerTimeout: no item freed up within *timeout*.
        :raises ClaimLost: on exit, when the item had already been freed (TTL, session).
        """
        return self._hold("pool", name, ttl, timeout)

    def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Block until the run-wide rate of *rate* calls per *per* seconds allows a call.

        Calls are served in arrival order: each reserves the next free slot in Redis
        and sleeps until it starts.

        :raises BrokerTimeout: the next slot starts later than *timeout* seconds from now
            (nothing is reserved then).
        """
        self._run(flows.throttle(name, rate, per, timeout))

    def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait until *parties* callers reached barrier *name*; returns this arrival's index.

        The barrier is reusable (the next *parties* callers form the next round). If a
        waiting member dies or times out, it is broken for every member, for good.

        :raises BarrierBroken: a member died or timed out.
        :raises BrokerTimeout: the others did not arrive within *timeout* (this breaks it).
        """
        return int(
            self._owned(
                lambda sid: flows.barrier(self.prefix, sid, self._tid(sid), name, parties, timeout)
            )
        )

    def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; returns its new length."""
        return int(self._run(flows.push(queue, items)))

    def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting for one up to *timeout* seconds.

        Every item is popped by exactly one caller.

        :raises BrokerTimeout: the queue stayed empty.
        """
        return self._run(flows.pop(self.prefix, queue, timeout))

    # ------------------------------------------------------------------ observability

    def status(self) -> dict[str, Any]:
        """Holders, waiters and sessions of the run: what, who, since when, TTL left.

        ``{"holders": [...], "waiters": [...], "sessions": [...], "time": EPOCH_S}``; each
        entry has ``kind``, ``name``, ``who`` (``pid``, ``host``, ``worker``, ``session``),
        ``since`` (epoch seconds) and, for holders, ``ttl_left`` (seconds or None).
        """
        return dict(self._run(flows.status()))

    def stats(self) -> dict[str, Any]:
        """Counts for the run: items, leases, sessions, holders, waiters."""
        return dict(self._run(flows.stats()))

    def health(self) -> dict[str, Any]:
        """``status`` (``healthy``), Redis version and uptime, and the ping latency."""
        latency = self.ping()
        info = self._call(lambda: self._r.info("server"))
        return _health(info, latency)

    def metrics(self) -> str:
        """Prometheus text with the run's counts (the socket broker's ``corral_broker_*``)."""
        return _metrics(self.stats(), self.run_id)

    def purge(self) -> int:
        """Delete every key of this run (end of a CI pipeline); returns how many.

        Do not call it while other clients of the run still work.
        """
        keys = self._call(lambda: list(self._r.scan_iter(match=self.prefix + "*", count=500)))
        deleted = 0
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            deleted += int(self._call(lambda: self._r.unlink(*chunk)))  # noqa: B023
        return deleted

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> RedisClient:
        """Check now that Redis answers (instead of on the first request)."""
        self.ping()
        return self

    def close(self) -> None:
        """End the session (everything it holds is released at once), close. Idempotent."""
        if self._closed:
            return
        self._finalizer()
        self._closed = True
        self._r.close()
        self._rb.close()

    def __enter__(self) -> RedisClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ driver

    def _beat(self, sid: str, mode: str) -> Any:
        return self._execute(flows.Script("session", self._session_args(sid, mode)))

    def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BrokerUnavailable(f"this RedisClient is closed ({_redact(self.url)})")
        try:
            return fn()
        except self._redis_error as exc:
            raise _mapped(exc, self.url) from exc

    def _execute(self, op: flows.Op) -> Any:
        if isinstance(op, flows.Script):
            script = self._scripts[op.name]
            try:
                return self._call(lambda: script(keys=[self.prefix], args=op.args, client=self._r))
            except BaseException:
                # Interrupted (Ctrl-C, a lost connection) with the outcome unknown: the
                # script may have queued a ticket or granted a claim nobody would take.
                if op.cancel is not None:
                    with contextlib.suppress(BrokerError):
                        self._execute(op.cancel)
                raise
        if isinstance(op, flows.Command):
            command = self._r.execute_command
            return self._call(lambda: command(*op.args))  # type: ignore[no-untyped-call]
        if isinstance(op, flows.Wait):
            try:
                reply = self._call(lambda: self._rb.blpop([op.key], timeout=op.timeout))
            except BaseException:
                if op.cancel is not None:  # interrupted: never leave a grant behind
                    with contextlib.suppress(BrokerError):
                        self._execute(op.cancel)
                raise
            return None if reply is None else reply[1]
        time.sleep(op.seconds)
        return None

    def _run(self, flow: Generator[flows.Op, Any, T]) -> T:
        if self._closed:
            raise BrokerUnavailable(f"this RedisClient is closed ({_redact(self.url)})")
        try:
            op = next(flow)
            while True:
                op = flow.send(self._execute(op))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _owned(self, build: Callable[[str], Generator[flows.Op, Any, T]]) -> T:
        """Run the flow *build(sid)* that takes claims for this client's session; if Redis
        says the session expired meanwhile, run it once more under a new session."""
        sid = self._session.current()
        try:
            return self._run(build(sid))
        except BrokerRequestError as exc:
            if exc.code != "session_lost":
                raise
        return self._run(build(self._session.renew(sid)))

    @contextlib.contextmanager
    def _hold(
        self, kind: str, name: str, ttl: float | None, timeout: float | None
    ) -> Iterator[Any]:
        grant: flows.Grant = self._owned(
            lambda sid: flows.acquire(self.prefix, sid, self._tid(sid), kind, name, ttl, timeout)
        )
        try:
            yield grant.token if kind == "lock" else grant.value
        except BaseException:
            try:
                released = self._run(flows.unhold(grant))
            except BrokerError as exc:  # e.g. closed: the session's end freed it anyway
                log.warning("could not release %s %r: %s", kind, name, exc)
            else:
                if not released:
                    log.warning("%s %r was already freed when its holder failed", kind, name)
            raise
        if not self._run(flows.unhold(grant)):
            raise _lost(grant)


class AsyncRedisClient(_Base):
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
        redis = _import_redis()
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
        """Take the first item of *queue*, waiting up to *timeout* seconds."""
        return await self._run(flows.pop(self.prefix, queue, timeout))

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
        return _health(info, latency)

    async def metrics(self) -> str:
        """Prometheus text with the run's counts."""
        return _metrics(await self.stats(), self.run_id)

    async def purge(self) -> int:
        """Delete every key of this run; returns how many."""

        async def collect() -> list[str]:
            return [key async for key in self._r.scan_iter(match=self.prefix + "*", count=500)]

        keys: list[str] = await self._call(collect())
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += int(await self._call(self._r.unlink(*keys[start : start + 500])))
        return deleted

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
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({_redact(self.url)})")
        try:
            return await awaitable
        except self._redis_error as exc:
            raise _mapped(exc, self.url) from exc

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
            raise BrokerUnavailable(f"this AsyncRedisClient is closed ({_redact(self.url)})")
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
                log.warning("could not release %s %r: %s", kind, name, exc)
            else:
                if not released:
                    log.warning("%s %r was already freed when its holder failed", kind, name)
            raise
        if not await self._run(flows.unhold(grant)):
            raise _lost(grant)


def _lost(grant: flows.Grant) -> ClaimLost:
    exc = error_from_code(
        "claim_lost",
        key=grant.name,
        detail=f"{grant.kind} {grant.name!r} (token {grant.token}) was freed before release: "
        "its ttl passed or this client's session expired; another holder may have run meanwhile",
    )
    assert isinstance(exc, ClaimLost)
    return exc


def _health(info: dict[str, Any], latency: float) -> dict[str, Any]:
    return {
        "status": "healthy",
        "backend": "redis",
        "redisVersion": info.get("redis_version"),
        "uptime": int(info.get("uptime_in_seconds", 0)) * 1000,
        "timestamp": int(time.time() * 1000),
        "latencyMs": latency,
    }


def _metrics(stats: dict[str, Any], run_id: str) -> str:
    label = f'{{run="{run_id}"}}'
    lines = []
    for name, help_ in (
        ("items", "Live keys of the run"),
        ("leases", "Leases held"),
        ("sessions", "Live client sessions"),
        ("holders", "Locks and pool items held"),
        ("waiters", "Clients waiting for a lock, pool item, once value or barrier"),
    ):
        metric = f"corral_broker_{name}"
        lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge"]
        lines.append(f"{metric}{label} {stats[name]}")
    return "\n".join(lines) + "\n"
