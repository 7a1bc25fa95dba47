"""The blocking broker client: one persistent, authenticated connection per Client.

Operations are the generator flows of :mod:`corral.broker._flows`; this module only
moves their requests and answers over a socket (thread-safe, fork-aware).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time
from typing import Final

from corral.broker._address import busy, is_busy, next_delay, timeout_for, unavailable
from corral.broker._address import resolve_path as resolve_path  # re-exported (__all__)
from corral.broker._address import resolve_secret as resolve_secret  # re-exported (__all__)
from corral.broker._api_sync import ClientAPI
from corral.broker._backend import RedisSwitch
from corral.broker._spin import SpinPolicy, budget_from_env, peer_in_other_process, yield_cpu
from corral.broker.messages import CLOSED, NEED_DATA, Call, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection
from corral.errors import BrokerTimeout, BrokerUnavailable

__all__ = ["Client", "resolve_path", "resolve_secret"]

log = logging.getLogger("corral.broker.client")

# recv_into one preallocated buffer: recv(256 KiB) allocates and frees that much per
# call, which costs more CPU than the whole rest of a small request.
_RECV = 64 * 1024
# Kernel-side receive timeouts save a poll() per request (the socket stays blocking).
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")
# Idle extra connections a client keeps for requests that wait (see Client._checkout).
_MAX_SPARES = 4
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)  # peer_in_other_process checks it


class Client(RedisSwitch, ClientAPI):
    """A blocking client of the broker, keeping one connection open.

    :param path: the broker's socket; default ``$EPHEMERAL_PIPE``.
    :param secret: the broker's secret; default ``$EPHEMERAL_SECRET``.
    :param timeout: seconds to wait for each answer (and to connect: a broker whose
        listen backlog is full is retried until then, then :class:`BrokerTimeout`).
    :param compress_threshold: values whose JSON has at least this many characters are
        sent gzip+base64 compressed, as the Node client does (None: never).
    :param spin: seconds to poll for an answer before sleeping, when the broker is in
        another process (default ``$CORRAL_SPIN_US`` microseconds, else 50 µs; 0 = never).
        Requests that wait never poll. See ``docs/broker.md``, "Why polling".

    Thread-safe: calls from several threads are serialised on the connection; requests
    that wait (``lock``, ``acquire``, ``once``, ``barrier``, ``pop``, ``throttle``) run on
    extra connections of the client, so they never hold up the others. Everything the
    client holds is released by the broker the moment its connections close (``close()``,
    process exit, ``kill -9``). After ``fork()`` the child opens its own connections.
    If the broker closed the connection (it restarted), the next request reconnects,
    but only when that request had certainly not been sent; otherwise
    :class:`~corral.errors.BrokerUnavailable`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        secret: str | bytes | None = None,
        timeout: float = 5.0,
        *,
        compress_threshold: int | None = COMPRESS_THRESHOLD,
        spin: float | None = None,
    ) -> None:
        self._configure(path, secret, timeout, compress_threshold)
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._proto = ClientConnection()
        self._view = memoryview(bytearray(_RECV))
        self._pid = 0
        self._sock_timeout: float | None = None
        self._spin_budget = budget_from_env(spin)
        self._spin = SpinPolicy(0.0)  # set per connection: see _connect
        # A wait never holds up other threads' requests (see ClientAPI._checkout).
        self._spare_lock = threading.Lock()

    def close(self) -> None:
        """Close the connection; anything it owned on the broker is released. Idempotent."""
        with self._spare_lock:
            self._closed = True
            spares, self._spares = self._spares, []
            busy = list(self._busy)
        for spare in busy:
            spare._abort()  # a thread waiting on it gets BrokerUnavailable now
        for spare in spares:
            spare.close()
        with self._lock:
            self._closed = True
            self._forget()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "idle"
        return f"<Client {self.path!r} {state}>"

    # ------------------------------------------------------------------ driver

    def _spare(self) -> Client:
        return Client(
            self.path,
            self._secret,
            self.timeout,
            compress_threshold=self.compress_threshold,
            spin=self._spin_budget,
        )

    def _get_lock(self) -> threading.RLock:
        return self._lock

    def _abort(self) -> None:
        """Cut the connection under a thread that waits on it (without its lock)."""
        sock = self._sock
        if sock is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _ensure(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            return
        if self._sock is not None:  # forked: the parent keeps its connection
            self._forget()
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.settimeout(None)
                break
            except OSError as exc:
                sock.close()
                if not is_busy(exc):
                    raise unavailable(self.path, exc) from exc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise busy(self.path, self.timeout) from exc
                time.sleep(min(delay, left))
                delay = next_delay(delay)
        self._sock, self._pid = sock, os.getpid()
        # Spin only for a broker in another process: one in this process needs our GIL.
        self._spin = SpinPolicy(self._spin_budget if peer_in_other_process(sock) else 0.0)
        self._proto = ClientConnection()
        self._sock_timeout = None
        self._hello()

    def _forget(self) -> None:
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

    def _roundtrip(self, call: Call, retry: bool = True) -> Message:
        line = self._encode(call.request)
        sock = self._sock
        assert sock is not None
        timeout = timeout_for(call, self.timeout)
        # A wait keeps the socket's usual timeout (no setsockopt churn per lock) and
        # _receive retries reads until the wait's own deadline.
        self._set_timeout(sock, self.timeout if call.wait or timeout is None else timeout)
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            # The broker closed this connection before the request went out (it
            # restarted or stopped), so sending it on a fresh connection is safe.
            self._forget()
            if not retry:
                raise unavailable(self.path, exc) from exc
            self.reconnects += 1
            self._connect()
            return self._roundtrip(call, retry=False)
        except (BlockingIOError, TimeoutError) as exc:
            self._forget()
            raise BrokerTimeout(
                f"could not send to the broker at {self.path} in {self.timeout} s"
            ) from exc
        except OSError as exc:
            self._forget()
            raise unavailable(self.path, exc) from exc
        return self._receive(call, timeout)

    def _spin_recv(self, sock: socket.socket) -> int:
        policy = self._spin
        if not policy.should_spin():
            return 0
        clock = time.perf_counter
        end = clock() + policy.budget
        view = self._view
        recv_into = sock.recv_into
        while True:
            try:
                nbytes = recv_into(view, 0, _DONTWAIT)
            except BlockingIOError:
                if clock() >= end:
                    policy.miss()
                    return 0
                yield_cpu()
                continue
            policy.hit()
            return nbytes

    def _receive(self, call: Call, timeout: float | None) -> Message:
        proto, sock = self._proto, self._sock
        assert sock is not None
        deadline = None
        if call.wait and timeout is not None:
            deadline = time.monotonic() + timeout
        event = proto.next_event() if proto.has_buffered else NEED_DATA
        while True:
            if isinstance(event, Response):
                return event.obj
            if event is CLOSED:
                self._forget()
                raise BrokerUnavailable(
                    f"the broker at {self.path} closed the connection before answering "
                    f"{call.request.get('action')!r}; it may have stopped"
                )
            try:
                # Poll only for plain requests: a wait may be long, and a request that
                # wakes a waiter should leave the CPU to the process it wakes.
                nbytes = self._spin_recv(sock) if not (call.wait or call.wakes) else 0
                if not nbytes:
                    nbytes = sock.recv_into(self._view)
            except (BlockingIOError, TimeoutError) as exc:
                if call.wait and (deadline is None or time.monotonic() < deadline):
                    continue  # the broker ends a wait itself: keep reading
                # The answer may still come: this connection can no longer be trusted.
                self._forget()
                raise BrokerTimeout(
                    f"no answer to {call.request.get('action')!r} from the broker at "
                    f"{self.path} within {timeout} s"
                ) from exc
            except OSError as exc:
                self._forget()
                raise unavailable(self.path, exc) from exc
            proto.receive_data(self._view[:nbytes])
            event = proto.next_event()
