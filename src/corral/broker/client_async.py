"""The asyncio broker client: the same methods as :class:`~corral.broker.client.Client`.

It drives the same generator flows over an asyncio stream; it never runs the blocking
client in a thread, and the blocking client never runs this one on a hidden loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from corral.broker._address import busy, is_busy, next_delay, timeout_for, unavailable
from corral.broker._api_async import AsyncClientAPI
from corral.broker._backend import RedisSwitch
from corral.broker.messages import CLOSED, Call, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection
from corral.errors import BrokerTimeout, BrokerUnavailable

__all__ = ["AsyncClient"]

log = logging.getLogger("corral.broker.client")

_RECV = 64 * 1024
_MAX_SPARES = 4  # idle extra connections kept for requests that wait


class AsyncClient(RedisSwitch, AsyncClientAPI):
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

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        secret: str | bytes | None = None,
        timeout: float = 5.0,
        *,
        compress_threshold: int | None = COMPRESS_THRESHOLD,
    ) -> None:
        self._configure(path, secret, timeout, compress_threshold)
        self._lock: asyncio.Lock | None = None
        self._link: _Link | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # A wait runs on an extra connection (see AsyncClientAPI._checkout): it never
        # holds up other tasks, and cancelling it closes only its own connection. One
        # loop's tasks need no lock around the spares.
        self._spare_lock = contextlib.nullcontext()

    async def aclose(self) -> None:
        """Close the connection; anything it owned on the broker is released. Idempotent."""
        self._closed = True
        spares, self._spares = self._spares, []
        for spare in list(self._busy):
            spare._forget()  # a task waiting on it gets BrokerUnavailable now
        for spare in spares:
            await spare.aclose()
        await self._drop()

    def __repr__(self) -> str:
        state = "connected" if self._link is not None else "idle"
        return f"<AsyncClient {self.path!r} {state}>"

    # ------------------------------------------------------------------ driver

    def _spare(self) -> AsyncClient:
        return AsyncClient(
            self.path, self._secret, self.timeout, compress_threshold=self.compress_threshold
        )

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
        await self._hello()

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
