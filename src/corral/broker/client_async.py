"""The asyncio broker client: the same methods as :class:`~corral.broker.client.Client`.

It drives the same generator flows over an asyncio stream; it never runs the blocking
client in a thread, and the blocking client never runs this one on a hidden loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

from corral.broker import _flows
from corral.broker._address import (
    busy,
    is_busy,
    next_delay,
    resolve_path,
    resolve_secret,
    timeout_for,
    unavailable,
    wants_redis,
)
from corral.broker._flows import MISSING, Handshake
from corral.broker.messages import CLOSED, Call, Compute, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection, dumps, sign_message
from corral.errors import BrokerError, BrokerTimeout, BrokerUnavailable

__all__ = ["AsyncClient"]

log = logging.getLogger("corral.broker.client")
T = TypeVar("T")

_RECV = 64 * 1024
_MAX_SPARES = 4  # idle extra connections kept for requests that wait


class AsyncClient:
    """An asyncio client of the broker, keeping one connection open.

    :param path: the broker's socket; default ``$EPHEMERAL_PIPE``.
    :param secret: the broker's secret; default ``$EPHEMERAL_SECRET``.
    :param timeout: seconds to wait for each answer (and to connect).
    :param compress_threshold: values whose JSON has at least this many characters are
        sent gzip+base64 compressed, as the Node client does (None: never).

    Concurrent tasks share the connection; their requests are serialised. The
    connection belongs to the event loop that opened it: using the client from another
    loop while connected raises RuntimeError (an idle client rebinds freely).
    """

    # --- Redis backend (issue 9): a redis:// URL, or $CORRAL_BROKER_URL when no path is
    # given (it takes precedence over EPHEMERAL_PIPE), returns a AsyncRedisClient instead.
    def __new__(cls, path: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        if cls is AsyncClient and wants_redis(path):
            from corral.broker.redis import AsyncRedisClient

            return AsyncRedisClient(path if isinstance(path, str) else None, *args, **kwargs)
        return super().__new__(cls)

    # --- end of the Redis backend's hook

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        secret: str | bytes | None = None,
        timeout: float = 5.0,
        *,
        compress_threshold: int | None = COMPRESS_THRESHOLD,
    ) -> None:
        self.path = resolve_path(path)
        self._secret = resolve_secret(secret)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        self.compress_threshold = compress_threshold
        self._lock: asyncio.Lock | None = None
        self._link: _Link | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshake: Handshake | None = None
        self._instance: str | None = None
        self._closed = False
        self.reconnects = 0
        # Requests that wait run on extra connections (see Client._checkout): a wait
        # never holds up other tasks, and cancelling it closes only its own connection.
        self._spares: list[AsyncClient] = []
        self._busy: set[AsyncClient] = set()  # checked out: waiting, or holding a grant

    # ------------------------------------------------------------------ API

    async def ping(self) -> float:
        """Round-trip latency to the broker, in milliseconds."""
        return await self._run(_flows.ping())

    async def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default* when it is missing or expired.

        :raises KeyNotFound: no *default* and the key never existed or expired.
        """
        return await self._run(_flows.get(key, default))

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value under *key* for *ttl* seconds (the broker's default if None).

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        """
        await self._run(_flows.set_(key, value, ttl, self.compress_threshold))

    async def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return await self._run(_flows.delete(key))

    async def keys(self) -> list[str]:
        """The live keys."""
        return await self._run(_flows.keys())

    async def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id* (renews its own)."""
        return await self._run(_flows.lease(key, worker_id, ttl))

    async def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return await self._run(_flows.release(worker_id))

    # ------------------------------------------------------------------ coordination

    async def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if it is absent (or expired), atomically; True when this call set it."""
        return await self._run(_flows.add(key, value, ttl, self.compress_threshold))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (created at 0), atomically; the result."""
        return await self._run(_flows.incr(key, amount, ttl))

    async def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of *key*, computed by exactly one caller in the run (see
        :meth:`Client.once <corral.broker.client.Client.once>`); *compute* may be async.

        :raises OnceFailed: the computing caller's *compute* raised.
        :raises BrokerTimeout: the value was not ready within *timeout*.
        """
        if not callable(compute):
            raise TypeError("compute must be callable")
        flow = _flows.once(key, ttl, timeout, self.compress_threshold)
        spare = self._checkout()  # owns the compute claim until the value is stored
        try:
            return await spare._run(flow, here=True, compute=compute)
        finally:
            await self._checkin(spare)

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[int]:
        """``async with client.lock(name) as token:`` run-wide FIFO mutual exclusion.

        :raises BrokerTimeout: not acquired within *timeout*.
        :raises ClaimLost: on exit, when the lock had already been freed (its TTL passed).
        """
        return self._hold("lock", name, ttl, timeout)

    async def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* (idempotent). :raises PoolConflict: other items before."""
        return await self._run(_flows.pool(name, items))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractAsyncContextManager[Any]:
        """``async with client.acquire(name) as item:`` a free pool item, FIFO-fair.

        :raises KeyNotFound: the pool was never declared.
        :raises BrokerTimeout: no item freed up within *timeout*.
        """
        return self._hold("pool", name, ttl, timeout)

    async def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Wait until the run-wide rate of *rate* calls per *per* seconds allows a call."""
        await self._run(_flows.throttle(name, rate, per, timeout))

    async def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait for *parties* callers. :raises BarrierBroken: a member died or timed out."""
        return await self._run(_flows.barrier(name, parties, timeout))

    async def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; its new length."""
        return await self._run(_flows.push(queue, items))

    async def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting up to *timeout* seconds."""
        return await self._run(_flows.pop(queue, timeout))

    async def status(self) -> dict[str, Any]:
        """Who holds what and who waits for what (see :meth:`Client.status`)."""
        return await self._run(_flows.status())

    async def stats(self) -> dict[str, Any]:
        """Items, leases, capacity, memory, uptime."""
        return await self._run(_flows.stats())

    async def health(self) -> dict[str, Any]:
        """``status``, uptime, capacity, memory, connections."""
        return await self._run(_flows.health())

    async def metrics(self) -> str:
        """Prometheus text exposition of the broker's counters."""
        return await self._run(_flows.metrics())

    async def connect(self) -> AsyncClient:
        """Connect (and authenticate) now instead of on the first request."""
        async with self._get_lock():
            await self._ensure()
        return self

    async def aclose(self) -> None:
        """Close the connection; anything it owned on the broker is released. Idempotent."""
        self._closed = True
        spares, self._spares = self._spares, []
        for spare in list(self._busy):
            spare._forget()  # a task waiting on it gets BrokerUnavailable now
        for spare in spares:
            await spare.aclose()
        await self._drop()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "connected" if self._link is not None else "idle"
        return f"<AsyncClient {self.path!r} {state}>"

    # ------------------------------------------------------------------ driver

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            if self._link is not None:
                raise RuntimeError(
                    "this AsyncClient is connected on another event loop; aclose() it there, "
                    "or use one AsyncClient per event loop"
                )
            self._lock = asyncio.Lock()
            self._loop = loop
        return self._lock

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

    def _checkout(self) -> AsyncClient:
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        spare = self._spares.pop() if self._spares else None
        if spare is None:
            spare = AsyncClient(
                self.path, self._secret, self.timeout, compress_threshold=self.compress_threshold
            )
        self._busy.add(spare)
        return spare

    async def _checkin(self, spare: AsyncClient) -> None:
        self._busy.discard(spare)
        if self._closed or len(self._spares) >= _MAX_SPARES:
            await spare.aclose()
        else:
            self._spares.append(spare)

    async def _drive(
        self,
        flow: Generator[Call | Compute, Any, T],
        call: Call | Compute,
        compute: Callable[[], Any] | None = None,
    ) -> T:
        """Run *flow* from *call* on this connection (see ``Client._drive``); an async
        *compute* is awaited."""
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        async with self._get_lock():
            try:
                while True:
                    if isinstance(call, Compute):
                        assert compute is not None
                        try:
                            value = compute()
                            if inspect.isawaitable(value):
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
                        call = flow.throw(exc)  # the flow may answer it, or let it out
                        continue
                    call = flow.send(response)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

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
                with contextlib.suppress(BrokerError, RuntimeError):
                    back = spare._run(_flows.give_back(grant), here=True)
                    if not await asyncio.shield(back):
                        log.warning("%s %r was already freed when its holder failed", kind, name)
                raise
            if not await spare._run(_flows.give_back(grant), here=True):
                raise _flows.claim_lost(grant)
        finally:
            await self._checkin(spare)

    async def _ensure(self) -> None:
        if self._link is None:
            await self._connect()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = None
        tries: list[OSError] = []  # busy refusals, newest last
        try:
            async with asyncio.timeout(self.timeout):
                sock = await _connected(self.path, tries)
                _, link = await loop.create_unix_connection(_Link, sock=sock)
        except TimeoutError as exc:
            if sock is not None:
                sock.close()
            if tries and sock is None:
                raise busy(self.path, self.timeout) from tries[-1]
            raise BrokerTimeout(f"connecting to the broker at {self.path} timed out") from exc
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise unavailable(self.path, exc) from exc
        self._link = link
        self._handshake = Handshake(legacy=False)
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

    def _forget(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            # Its loop may be closed already; the transport is gone with it then.
            with contextlib.suppress(RuntimeError):
                link.transport.close()

    async def _drop(self) -> None:
        link = self._link
        self._forget()
        if link is not None and link.transport is not None:
            with contextlib.suppress(RuntimeError):
                await link.closed

    def _encode(self, request: Message) -> bytes:
        handshake = self._handshake
        if handshake is not None and handshake.legacy and self._secret is not None:
            return sign_message(self._secret, request)
        return dumps(request)

    async def _roundtrip(self, call: Call, retry: bool = True) -> Message:
        line = self._encode(call.request)
        link = self._link
        assert link is not None
        timeout = timeout_for(call, self.timeout)
        if link.lost:
            # Closed by the broker before this request went out: safe to send afresh.
            self._forget()
            if not retry:
                raise BrokerUnavailable(f"the broker at {self.path} closed the connection")
            self.reconnects += 1
            await self._connect()
            return await self._roundtrip(call, retry=False)
        try:
            async with asyncio.timeout(timeout):
                link.send(line)
                response = await link.response()
        except TimeoutError as exc:
            self._forget()
            raise BrokerTimeout(
                f"no answer to {call.request.get('action')!r} from the broker at "
                f"{self.path} within {timeout} s"
            ) from exc
        except BaseException:
            # Cancelled mid-request: a late answer would desynchronise the connection.
            self._forget()
            raise
        if response is None:
            self._forget()
            if isinstance(link.error, BrokenPipeError) and retry:
                # The send itself failed: the broker closed before it saw this request.
                self.reconnects += 1
                await self._connect()
                return await self._roundtrip(call, retry=False)
            raise BrokerUnavailable(
                f"the broker at {self.path} closed the connection before answering "
                f"{call.request.get('action')!r}; it may have stopped"
            )
        return response


class _Link(asyncio.BufferedProtocol):
    """The connection: reads into one preallocated buffer, feeds the sans-IO protocol."""

    def __init__(self) -> None:
        self.proto = ClientConnection()
        self.view = memoryview(bytearray(_RECV))
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.error: BaseException | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.proto.receive_data(self.view[:nbytes])
        self._wake()

    def eof_received(self) -> bool:
        self.proto.receive_data(b"")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self.proto.receive_data(b"")
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line)

    async def response(self) -> Message | None:
        """The next answer, or None when the connection closed first."""
        proto = self.proto
        while True:
            event = proto.next_event()
            if isinstance(event, Response):
                return event.obj
            if event is CLOSED:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


async def _connected(path: str, tries: list[OSError]) -> socket.socket:
    """A socket connected to *path*, retrying while the broker's backlog is full
    (each refusal is recorded in *tries*); the caller's timeout scope ends the retries.

    Not ``loop.sock_connect``: it takes EAGAIN for "connection in progress" and hands
    back a socket that never connected.
    """
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)  # a Unix socket connects at once, or fails at once
        except OSError as exc:
            sock.close()
            if not is_busy(exc):
                raise
            del tries[:-1]
            tries.append(exc)
            await asyncio.sleep(delay)
            delay = next_delay(delay)
            continue
        return sock
