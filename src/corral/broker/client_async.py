"""The asyncio broker client: the same methods as :class:`~corral.broker.client.Client`.

It drives the same generator flows over an asyncio stream; it never runs the blocking
client in a thread, and the blocking client never runs this one on a hidden loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Generator
from types import TracebackType
from typing import Any, TypeVar

from corral.broker import _flows
from corral.broker._flows import MISSING, Handshake
from corral.broker._redis_session import wants_redis
from corral.broker.client import resolve_path, resolve_secret, unavailable
from corral.broker.messages import CLOSED, Call, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection, dumps, sign_message
from corral.errors import BrokerTimeout, BrokerUnavailable

__all__ = ["AsyncClient"]

log = logging.getLogger("corral.broker.client")
T = TypeVar("T")

_RECV = 64 * 1024


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

    async def _run(self, flow: Generator[Call, Message, T]) -> T:
        if self._closed:
            raise BrokerUnavailable("this AsyncClient is closed")
        try:
            call = next(flow)  # validates arguments before anything is sent
        except StopIteration as stop:  # pragma: no cover - every flow sends something
            return stop.value  # type: ignore[no-any-return]
        async with self._get_lock():
            await self._ensure()
            try:
                while True:
                    call = flow.send(await self._roundtrip(call))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    async def _ensure(self) -> None:
        if self._link is None:
            await self._connect()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                _, link = await loop.create_unix_connection(_Link, self.path)
        except TimeoutError as exc:
            raise BrokerTimeout(f"connecting to the broker at {self.path} timed out") from exc
        except OSError as exc:
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
        timeout = self.timeout if call.timeout is None else call.timeout
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
