"""The broker client's methods, written once: :class:`AsyncClientAPI`, the asyncio source.

Each method validates its arguments and runs one flow of :mod:`corral.broker._flows`;
the client that inherits it supplies the I/O (``_drive``: one connection; ``_checkout``:
an extra connection for a request that waits). :class:`AsyncOnceAPI` (``once``) is
shared with the Redis clients, which compute through their own ``_once``.
``_api_sync.py`` (``ClientAPI``, for the blocking ``Client``) is generated from
``_api_async.py`` by tools/async_to_sync.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, Self, TypeVar

from corral._lifecycle import AsyncClosing
from corral._twins import ASYNC
from corral.broker import _flows
from corral.broker._address import resolve_path, resolve_secret
from corral.broker._flows import MISSING, Handshake
from corral.broker.messages import Call, Compute, Message
from corral.broker.protocol import dumps, sign_message
from corral.errors import BrokerError, BrokerUnavailable

__all__ = ["AsyncClientAPI", "AsyncOnceAPI"]

log = logging.getLogger("corral.broker.client")
T = TypeVar("T")

_MAX_SPARES = 4  # idle extra connections a client keeps for requests that wait


class AsyncOnceAPI:
    """``once``, the same on both backends; each computes through its ``_once``."""

    async def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of *key*, computed by exactly one caller in the whole run.

        The first caller runs ``compute()`` (an async *compute* is awaited) and stores
        its JSON result under *key* for *ttl* seconds (``get(key)`` reads it); the others
        wait (up to *timeout* seconds) and get the same value. If *compute* raises, that
        caller gets its exception and every other caller (also later ones, for *ttl*)
        :class:`~corral.errors.OnceFailed` with the original message. If the computing
        process dies, one waiter is elected to compute instead.

        :raises OnceFailed: the computing caller's *compute* raised.
        :raises BrokerTimeout: the value was not ready within *timeout*.
        :raises TypeError: *compute* returned a value that is not JSON.
        """
        if not callable(compute):
            raise TypeError("compute must be callable")
        return await self._once(key, compute, ttl, timeout)

    async def _once(
        self, key: str, compute: Callable[[], Any], ttl: float | None, timeout: float | None
    ) -> Any:
        """Compute or wait for *key*'s value on this backend (*compute* is callable)."""
        raise NotImplementedError


class AsyncClientAPI(AsyncOnceAPI, AsyncClosing):
    """The public methods of :class:`~corral.broker.AsyncClient`, over its I/O driver."""

    path: str
    timeout: float
    compress_threshold: int | None
    reconnects: int
    _secret: bytes | None
    _handshake: Handshake | None
    _instance: str | None
    _closed: bool
    _spares: list[Self]
    _busy: set[Self]
    # Guards _spares/_busy: a lock for the blocking client's threads; tasks need none.
    _spare_lock: AbstractContextManager[Any]

    def _configure(
        self,
        path: str | os.PathLike[str] | None,
        secret: str | bytes | None,
        timeout: float,
        compress_threshold: int | None,
    ) -> None:
        """What every client's ``__init__`` sets first (its I/O state comes after)."""
        self.path = resolve_path(path)
        self._secret = resolve_secret(secret)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self.compress_threshold = compress_threshold
        self._handshake = None
        self._instance = None
        self._closed = False
        self.reconnects = 0
        # Requests that wait (lock, acquire, once, barrier, pop...) run on extra
        # connections of this client (see _checkout), kept for reuse.
        self._spares = []
        self._busy = set()  # checked out: waiting, or holding a grant

    # ------------------------------------------------------------------ API

    async def ping(self) -> float:
        """Round-trip latency to the broker, in milliseconds."""
        return await self._run(_flows.ping())

    async def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default* when it is missing or expired.

        :raises KeyNotFound: no *default* and the key never existed or expired
            (``exc.expired`` tells which).
        """
        return await self._run(_flows.get(key, default))

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value under *key* for *ttl* seconds (the broker's default if None).

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises TTLRequired: the broker requires a TTL and none was given.
        :raises TooLarge: the value is over the broker's ``max_value_size``.
        :raises CapacityExceeded: the broker is full of other keys.
        """
        await self._run(_flows.set_(key, value, ttl, self.compress_threshold))

    async def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return await self._run(_flows.delete(key))

    async def keys(self) -> list[str]:
        """The live keys."""
        return await self._run(_flows.keys())

    async def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id* (renews its own).

        A lease taken through this client is also freed when its connection closes.

        :raises LeaseError: *worker_id* already leases under another key.
        """
        return await self._run(_flows.lease(key, worker_id, ttl))

    async def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return await self._run(_flows.release(worker_id))

    # ------------------------------------------------------------------ coordination

    async def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if it is absent (or expired), atomically; True when this call set it.

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises TTLRequired: the broker requires a TTL and none was given.
        """
        return await self._run(_flows.add(key, value, ttl, self.compress_threshold))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (created at 0), atomically; the result.

        A new counter lives *ttl* seconds (the broker's default TTL when None); an
        existing one keeps its deadline unless *ttl* is given.

        :raises InvalidRequest: the value at *key* is not an integer.
        :raises CounterOverflow: the amount, the integer at *key* or the result is outside
            the signed 64-bit range; the key is unchanged.
        """
        return await self._run(_flows.incr(key, amount, ttl))

    async def _once(
        self, key: str, compute: Callable[[], Any], ttl: float | None, timeout: float | None
    ) -> Any:
        flow = _flows.once(key, ttl, timeout, self.compress_threshold)
        spare = self._checkout()  # owns the compute claim until the value is stored
        try:
            return await spare._run(flow, here=True, compute=compute)
        finally:
            await self._checkin(spare)

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[int]:
        """``async with client.lock(name) as token:`` run-wide mutual exclusion, FIFO-fair.

        :param ttl: free the lock after this many seconds even if still held (a safety
            net for a holder that hangs); None: held until released or this client's
            connection closes.
        :param timeout: give up waiting after this many seconds (0: do not wait).
        :returns: a context manager yielding the fencing token (increasing per name).
        :raises BrokerTimeout: not acquired within *timeout*.
        :raises ClaimLost: on exit, when the lock had already been freed (its TTL passed).
        """
        return self._hold("lock", name, ttl, timeout)

    async def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* of JSON *items* (idempotent); True when this call created it.

        :raises PoolConflict: it was declared before with different items.
        """
        return await self._run(_flows.pool(name, items))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractAsyncContextManager[Any]:
        """``async with client.acquire(name) as item:`` a free item of pool *name*, FIFO-fair.

        :raises KeyNotFound: the pool was never declared.
        :raises BrokerTimeout: no item freed up within *timeout*.
        :raises ClaimLost: on exit, when the item had already been freed (its TTL passed).
        """
        return self._hold("pool", name, ttl, timeout)

    async def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Wait until the run-wide rate of *rate* calls per *per* seconds allows a call.

        Calls are served in arrival order; the broker answers when the slot starts.

        :raises BrokerTimeout: the next slot starts later than *timeout* seconds from now
            (known at once; nothing is reserved then).
        """
        await self._run(_flows.throttle(name, rate, per, timeout))

    async def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait until *parties* callers reached barrier *name*; this arrival's index.

        Reusable: the next *parties* callers form the next round. If a waiting member
        dies (its connection closes) or times out, the barrier breaks for every member,
        for good.

        :raises BarrierBroken: a member died or timed out.
        :raises BrokerTimeout: the others did not arrive within *timeout* (this breaks it).
        """
        return await self._run(_flows.barrier(name, parties, timeout))

    async def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; its new length (waiting poppers get them first)."""
        return await self._run(_flows.push(queue, items))

    async def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting for one up to *timeout* seconds.

        Every item is popped by exactly one caller.

        :raises BrokerTimeout: the queue stayed empty.
        """
        return await self._run(_flows.pop(queue, timeout))

    async def status(self) -> dict[str, Any]:
        """Who holds what and who waits for what (what ``corral status`` prints).

        ``{"holders": [...], "waiters": [...], "sessions": [...], "time": EPOCH_S}``;
        each entry has ``kind``, ``name``, ``who`` (``pid``, ``worker``, ``session``...),
        ``since`` (epoch seconds) and, for holders, ``ttl_left`` (seconds or None).
        """
        return await self._run(_flows.status())

    async def stats(self) -> dict[str, Any]:
        """Items, leases, capacity, memory, uptime."""
        return await self._run(_flows.stats())

    async def health(self) -> dict[str, Any]:
        """``status`` (``healthy``/``degraded``), uptime, capacity, memory, connections."""
        return await self._run(_flows.health())

    async def metrics(self) -> str:
        """Prometheus text exposition of the broker's counters."""
        return await self._run(_flows.metrics())

    async def connect(self) -> Self:
        """Connect (and authenticate) now instead of on the first request.

        :raises BrokerUnavailable: nothing answers at the path.
        :raises AuthFailed: the secret is missing or wrong.
        """
        async with self._get_lock():
            await self._ensure()
        return self

    # ------------------------------------------------------------------ driver

    async def _run(
        self,
        flow: Generator[Call | Compute, Any, T],
        here: bool = False,
        compute: Callable[[], Any] | None = None,
    ) -> T:
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        try:
            call = next(flow)  # validates arguments before anything is sent
        except StopIteration as stop:  # pragma: no cover - every flow sends something
            return stop.value  # type: ignore[no-any-return]
        if isinstance(call, Call) and call.wait and not here:
            spare = self._checkout()
            try:
                return await spare._drive(flow, call)
            finally:
                await self._checkin(spare)
        return await self._drive(flow, call, compute)

    @contextlib.asynccontextmanager
    async def _hold(
        self, kind: str, name: str, ttl: float | None, timeout: float | None
    ) -> AsyncIterator[Any]:
        spare = self._checkout()  # holds the grant: given back on the same connection
        try:
            grant = await spare._run(_flows.take(kind, name, ttl, timeout), here=True)
            try:
                yield grant.token if kind == "lock" else grant.value
            except BaseException:
                # RuntimeError: an event loop closing under an asyncio holder.
                with contextlib.suppress(BrokerError, RuntimeError):
                    back = spare._run(_flows.give_back(grant), here=True)
                    if not await asyncio.shield(back):
                        log.warning("%s %r was already freed when its holder failed", kind, name)
                raise
            if not await spare._run(_flows.give_back(grant), here=True):
                raise _flows.claim_lost(grant)
        finally:
            await self._checkin(spare)

    async def _drive(
        self,
        flow: Generator[Call | Compute, Any, T],
        call: Call | Compute,
        compute: Callable[[], Any] | None = None,
    ) -> T:
        """Run *flow* from *call* on this connection; errors are thrown into the flow,
        which may answer them (a failed ``once`` reports its error) or let them out."""
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        async with self._get_lock():
            if self._closed:
                raise BrokerUnavailable("this AsyncClient is closed")
            try:
                while True:
                    if isinstance(call, Compute):
                        assert compute is not None
                        try:
                            value = compute()
                            if ASYNC and inspect.isawaitable(value):
                                value = await value
                        except BaseException as exc:
                            call = flow.throw(exc)
                        else:
                            call = flow.send(value)
                        continue
                    try:
                        await self._ensure()
                        response = await self._roundtrip(call)
                    except BaseException as exc:
                        if not ASYNC:
                            # Failed or interrupted mid-request (Ctrl-C): a late answer
                            # would be taken for the next request's: this connection is
                            # done. (The asyncio _roundtrip forgets its link itself.)
                            self._forget()
                        call = flow.throw(exc)
                        continue
                    call = flow.send(response)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def _checkout(self) -> Self:
        """An extra connection of this client for a request that waits.

        A wait never holds up other requests on the main connection (nor the release of
        a lock another thread holds), and what it is granted belongs to that connection
        until given back, so the connection is not reused meanwhile.
        """
        with self._spare_lock:
            if self._closed:
                raise BrokerUnavailable("this AsyncClient is closed")
            spare = self._spares.pop() if self._spares else self._spare()
            self._busy.add(spare)
            return spare

    async def _checkin(self, spare: Self) -> None:
        with self._spare_lock:
            self._busy.discard(spare)
            if self._closed or len(self._spares) >= _MAX_SPARES:
                await spare.aclose()
            else:
                self._spares.append(spare)

    async def _hello(self) -> None:
        """Authenticate the connection just opened; warn when the broker restarted."""
        self._handshake = Handshake(legacy=False)  # hello itself goes out unsigned
        flow = _flows.hello(self._secret)
        try:
            call = next(flow)
            while True:
                call = flow.send(await self._roundtrip(call, retry=False))
        except StopIteration as stop:
            handshake: Handshake = stop.value
        except BaseException:
            self._forget()
            raise
        self._handshake = handshake
        if self._instance is not None and handshake.instance != self._instance:
            log.warning(
                "the broker at %s restarted: keys and leases from before are gone", self.path
            )
        self._instance = handshake.instance

    def _encode(self, request: Message) -> bytes:
        handshake = self._handshake
        if handshake is not None and handshake.legacy and self._secret is not None:
            return sign_message(self._secret, request)
        return dumps(request)

    # What the client supplies: its connections (client.py, client_async.py).

    def _spare(self) -> Self:
        """A new client like this one, for :meth:`_checkout`."""
        raise NotImplementedError

    def _get_lock(self) -> AbstractAsyncContextManager[Any]:
        """The lock that serialises requests on this client's main connection."""
        raise NotImplementedError

    async def _ensure(self) -> None:
        """Connect unless connected (in this process)."""
        raise NotImplementedError

    async def _roundtrip(self, call: Call, retry: bool = True) -> Message:
        """Send *call*'s request, return the answer."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Close the connection now (a late answer must never be read)."""
        raise NotImplementedError
