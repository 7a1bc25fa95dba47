"""The blocking broker client: one persistent, authenticated connection per Client.

Operations are the generator flows of :mod:`corral.broker._flows`; this module only
moves their requests and answers over a socket (thread-safe, fork-aware).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Generator
from types import TracebackType
from typing import Any, TypeVar

from corral.broker import _flows
from corral.broker._flows import MISSING, Handshake
from corral.broker._redis_session import wants_redis
from corral.broker.messages import CLOSED, NEED_DATA, Call, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection, dumps, sign_message
from corral.errors import BrokerTimeout, BrokerUnavailable

__all__ = ["Client", "resolve_path", "resolve_secret"]

log = logging.getLogger("corral.broker.client")
T = TypeVar("T")

# recv_into one preallocated buffer: recv(256 KiB) allocates and frees that much per
# call, which costs more CPU than the whole rest of a small request.
_RECV = 64 * 1024
# Kernel-side receive timeouts save a poll() per request (the socket stays blocking).
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")


def resolve_path(path: str | os.PathLike[str] | None) -> str:
    """*path*, else ``$EPHEMERAL_PIPE``.

    :raises BrokerUnavailable: neither is set.
    """
    if path is not None:
        return os.fspath(path)
    env = os.environ.get("EPHEMERAL_PIPE")
    if not env:
        raise BrokerUnavailable(
            "no broker path: pass path= or set EPHEMERAL_PIPE "
            "(run your command under `corral run -- CMD`, or start a Broker)"
        )
    return env


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """*secret*, else ``$EPHEMERAL_SECRET``, as bytes (None when neither is set)."""
    if secret is None:
        secret = os.environ.get("EPHEMERAL_SECRET") or None
    if isinstance(secret, str):
        return secret.encode()
    return secret


def unavailable(path: str, exc: BaseException) -> BrokerUnavailable:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return BrokerUnavailable(
        f"cannot reach the broker at {path}: {reason}. Is it running? "
        "(`corral run -- CMD` starts one and sets EPHEMERAL_PIPE)"
    )


class Client:
    """A blocking client of the broker, keeping one connection open.

    :param path: the broker's socket; default ``$EPHEMERAL_PIPE``.
    :param secret: the broker's secret; default ``$EPHEMERAL_SECRET``.
    :param timeout: seconds to wait for each answer (and to connect).
    :param compress_threshold: values whose JSON has at least this many characters are
        sent gzip+base64 compressed, as the Node client does (None: never).

    Thread-safe: calls from several threads are serialised on the connection. After
    ``fork()`` the child opens its own connection. If the broker closed the connection
    (it restarted), the next request reconnects, but only when that request had
    certainly not been sent; otherwise :class:`~corral.errors.BrokerUnavailable`.
    """

    # --- Redis backend (issue 9): a redis:// URL, or $CORRAL_BROKER_URL when no path is
    # given (it takes precedence over EPHEMERAL_PIPE), returns a RedisClient instead.
    def __new__(cls, path: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        if cls is Client and wants_redis(path):
            from corral.broker.redis import RedisClient

            return RedisClient(path if isinstance(path, str) else None, *args, **kwargs)
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
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._proto = ClientConnection()
        self._view = memoryview(bytearray(_RECV))
        self._pid = 0
        self._sock_timeout: float | None = None
        self._handshake: Handshake | None = None
        self._instance: str | None = None
        self._closed = False
        self.reconnects = 0

    # ------------------------------------------------------------------ API

    def ping(self) -> float:
        """Round-trip latency to the broker, in milliseconds."""
        return self._run(_flows.ping())

    def get(self, key: str, default: Any = MISSING) -> Any:
        """The value of *key*, or *default* when it is missing or expired.

        :raises KeyNotFound: no *default* and the key never existed or expired
            (``exc.expired`` tells which).
        """
        return self._run(_flows.get(key, default))

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store a JSON value under *key* for *ttl* seconds (the broker's default if None).

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises TTLRequired: the broker requires a TTL and none was given.
        :raises TooLarge: the value is over the broker's ``max_value_size``.
        :raises CapacityExceeded: the broker is full of other keys.
        """
        self._run(_flows.set_(key, value, ttl, self.compress_threshold))

    def delete(self, key: str) -> bool:
        """Remove *key*; True when it existed."""
        return self._run(_flows.delete(key))

    def keys(self) -> list[str]:
        """The live keys."""
        return self._run(_flows.keys())

    def lease(self, key: str, worker_id: str, ttl: float | None = None) -> int:
        """Lease the smallest free integer under *key* for *worker_id* (renews its own).

        A lease taken through this client is also freed when its connection closes.

        :raises LeaseError: *worker_id* already leases under another key.
        """
        return self._run(_flows.lease(key, worker_id, ttl))

    def release(self, worker_id: str) -> bool:
        """Free *worker_id*'s lease; True when it held one."""
        return self._run(_flows.release(worker_id))

    def stats(self) -> dict[str, Any]:
        """Items, leases, capacity, memory, uptime."""
        return self._run(_flows.stats())

    def health(self) -> dict[str, Any]:
        """``status`` (``healthy``/``degraded``), uptime, capacity, memory, connections."""
        return self._run(_flows.health())

    def metrics(self) -> str:
        """Prometheus text exposition of the broker's counters."""
        return self._run(_flows.metrics())

    def connect(self) -> Client:
        """Connect (and authenticate) now instead of on the first request.

        :raises BrokerUnavailable: nothing answers at the path.
        :raises AuthFailed: the secret is missing or wrong.
        """
        with self._lock:
            self._ensure()
        return self

    def close(self) -> None:
        """Close the connection; anything it owned on the broker is released. Idempotent."""
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "idle"
        return f"<Client {self.path!r} {state}>"

    # ------------------------------------------------------------------ driver

    def _run(self, flow: Generator[Call, Message, T]) -> T:
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            try:
                call = next(flow)  # validates arguments before anything is sent
                self._ensure()
                while True:
                    call = flow.send(self._roundtrip(call))
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def _ensure(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            return
        if self._sock is not None:  # forked: the parent keeps its connection
            self._drop()
        self._connect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise unavailable(self.path, exc) from exc
        self._sock, self._pid = sock, os.getpid()
        self._proto = ClientConnection()
        self._sock_timeout = None
        self._handshake = Handshake(legacy=False)  # hello itself goes out unsigned
        flow = _flows.hello(self._secret)
        try:
            call = next(flow)
            while True:
                call = flow.send(self._roundtrip(call, retry=False))
        except StopIteration as stop:
            handshake: Handshake = stop.value
        except BaseException:
            self._drop()
            raise
        self._handshake = handshake
        if self._instance is not None and handshake.instance != self._instance:
            log.warning(
                "the broker at %s restarted: keys and leases from before are gone", self.path
            )
        self._instance = handshake.instance

    def _drop(self) -> None:
        # close() (not shutdown) in a forked child leaves the parent's connection intact.
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def _set_timeout(self, sock: socket.socket, timeout: float) -> None:
        if timeout == self._sock_timeout:
            return
        if _KERNEL_TIMEOUTS:
            seconds = int(timeout)
            tv = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        else:
            sock.settimeout(timeout)
        self._sock_timeout = timeout

    def _encode(self, request: Message) -> bytes:
        handshake = self._handshake
        if handshake is not None and handshake.legacy and self._secret is not None:
            return sign_message(self._secret, request)
        return dumps(request)

    def _roundtrip(self, call: Call, retry: bool = True) -> Message:
        line = self._encode(call.request)
        sock = self._sock
        assert sock is not None
        timeout = self.timeout if call.timeout is None else call.timeout
        self._set_timeout(sock, timeout)
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            # The broker closed this connection before the request went out (it
            # restarted or stopped), so sending it on a fresh connection is safe.
            self._drop()
            if not retry:
                raise unavailable(self.path, exc) from exc
            self.reconnects += 1
            self._connect()
            return self._roundtrip(call, retry=False)
        except (BlockingIOError, TimeoutError) as exc:
            self._drop()
            raise BrokerTimeout(
                f"could not send to the broker at {self.path} in {timeout} s"
            ) from exc
        except OSError as exc:
            self._drop()
            raise unavailable(self.path, exc) from exc
        return self._receive(call, timeout)

    def _receive(self, call: Call, timeout: float) -> Message:
        proto, sock = self._proto, self._sock
        assert sock is not None
        event = proto.next_event() if proto.has_buffered else NEED_DATA
        while True:
            if isinstance(event, Response):
                return event.obj
            if event is CLOSED:
                self._drop()
                raise BrokerUnavailable(
                    f"the broker at {self.path} closed the connection before answering "
                    f"{call.request.get('action')!r}; it may have stopped"
                )
            try:
                nbytes = sock.recv_into(self._view)
            except (BlockingIOError, TimeoutError) as exc:
                # The answer may still come: this connection can no longer be trusted.
                self._drop()
                raise BrokerTimeout(
                    f"no answer to {call.request.get('action')!r} from the broker at "
                    f"{self.path} within {timeout} s"
                ) from exc
            except OSError as exc:
                self._drop()
                raise unavailable(self.path, exc) from exc
            proto.receive_data(self._view[:nbytes])
            event = proto.next_event()
