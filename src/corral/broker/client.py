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
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Final, TypeVar

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
from corral.broker._spin import SpinPolicy, budget_from_env, peer_in_other_process, yield_cpu
from corral.broker.messages import CLOSED, NEED_DATA, Call, Compute, Message, Response
from corral.broker.protocol import COMPRESS_THRESHOLD, ClientConnection, dumps, sign_message
from corral.errors import BrokerError, BrokerTimeout, BrokerUnavailable

__all__ = ["Client", "resolve_path", "resolve_secret"]

log = logging.getLogger("corral.broker.client")
T = TypeVar("T")

# recv_into one preallocated buffer: recv(256 KiB) allocates and frees that much per
# call, which costs more CPU than the whole rest of a small request.
_RECV = 64 * 1024
# Kernel-side receive timeouts save a poll() per request (the socket stays blocking).
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")
# Idle extra connections a client keeps for requests that wait (see Client._checkout).
_MAX_SPARES = 4
_DONTWAIT: Final = getattr(socket, "MSG_DONTWAIT", 0)  # peer_in_other_process checks it


class Client:
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
        spin: float | None = None,
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
        self._spin_budget = budget_from_env(spin)
        self._spin = SpinPolicy(0.0)  # set per connection: see _connect
        # Requests that wait (lock, acquire, once, barrier, pop...) run on extra
        # connections of this client, so a wait never holds up other threads' requests
        # (or the release of a lock another thread holds). Kept for reuse.
        self._spares: list[Client] = []
        self._busy: set[Client] = set()  # checked out: waiting, or holding a grant
        self._spare_lock = threading.Lock()

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

    # ------------------------------------------------------------------ coordination

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Set *key* only if it is absent (or expired), atomically; True when this call set it.

        :raises TypeError: *value* is not JSON-serialisable (nothing was sent).
        :raises TTLRequired: the broker requires a TTL and none was given.
        """
        return self._run(_flows.add(key, value, ttl, self.compress_threshold))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (created at 0), atomically; the result.

        A new counter lives *ttl* seconds (the broker's default TTL when None); an
        existing one keeps its deadline unless *ttl* is given.

        :raises InvalidRequest: the value at *key* is not an integer.
        :raises CounterOverflow: the amount, the integer at *key* or the result is outside
            the signed 64-bit range; the key is unchanged.
        """
        return self._run(_flows.incr(key, amount, ttl))

    def once(
        self,
        key: str,
        compute: Callable[[], Any],
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The value of *key*, computed by exactly one caller in the whole run.

        The first caller runs ``compute()`` and stores its JSON result under *key* for
        *ttl* seconds (``get(key)`` reads it); the others wait (up to *timeout* seconds)
        and get the same value. If *compute* raises, that caller gets its exception and
        every other caller (also later ones, for *ttl*) :class:`~corral.errors.OnceFailed`
        with the original message. If the computing process dies, one waiter is elected
        to compute instead.

        :raises OnceFailed: the computing caller's *compute* raised.
        :raises BrokerTimeout: the value was not ready within *timeout*.
        :raises TypeError: *compute* returned a value that is not JSON.
        """
        if not callable(compute):
            raise TypeError("compute must be callable")
        flow = _flows.once(key, ttl, timeout, self.compress_threshold)
        spare = self._checkout()  # owns the compute claim until the value is stored
        try:
            return spare._run(flow, here=True, compute=compute)
        finally:
            self._checkin(spare)

    def lock(
        self, name: str, ttl: float | None = None, timeout: float | None = None
    ) -> AbstractContextManager[int]:
        """``with client.lock(name) as token:`` run-wide mutual exclusion, FIFO-fair.

        :param ttl: free the lock after this many seconds even if still held (a safety
            net for a holder that hangs); None: held until released or this client's
            connection closes.
        :param timeout: give up waiting after this many seconds (0: do not wait).
        :returns: a context manager yielding the fencing token (increasing per name).
        :raises BrokerTimeout: not acquired within *timeout*.
        :raises ClaimLost: on exit, when the lock had already been freed (its TTL passed).
        """
        return self._hold("lock", name, ttl, timeout)

    def pool(self, name: str, items: Sequence[Any]) -> bool:
        """Declare pool *name* of JSON *items* (idempotent); True when this call created it.

        :raises PoolConflict: it was declared before with different items.
        """
        return self._run(_flows.pool(name, items))

    def acquire(
        self, name: str, timeout: float | None = None, ttl: float | None = None
    ) -> AbstractContextManager[Any]:
        """``with client.acquire(name) as item:`` a free item of pool *name*, FIFO-fair.

        :raises KeyNotFound: the pool was never declared.
        :raises BrokerTimeout: no item freed up within *timeout*.
        :raises ClaimLost: on exit, when the item had already been freed (its TTL passed).
        """
        return self._hold("pool", name, ttl, timeout)

    def throttle(
        self, name: str, rate: float, per: float = 1.0, timeout: float | None = None
    ) -> None:
        """Block until the run-wide rate of *rate* calls per *per* seconds allows a call.

        Calls are served in arrival order; the broker answers when the slot starts.

        :raises BrokerTimeout: the next slot starts later than *timeout* seconds from now
            (known at once; nothing is reserved then).
        """
        self._run(_flows.throttle(name, rate, per, timeout))

    def barrier(self, name: str, parties: int, timeout: float | None = None) -> int:
        """Wait until *parties* callers reached barrier *name*; this arrival's index.

        Reusable: the next *parties* callers form the next round. If a waiting member
        dies (its connection closes) or times out, the barrier breaks for every member,
        for good.

        :raises BarrierBroken: a member died or timed out.
        :raises BrokerTimeout: the others did not arrive within *timeout* (this breaks it).
        """
        return self._run(_flows.barrier(name, parties, timeout))

    def push(self, queue: str, *items: Any) -> int:
        """Append JSON *items* to *queue*; its new length (waiting poppers get them first)."""
        return self._run(_flows.push(queue, items))

    def pop(self, queue: str, timeout: float | None = None) -> Any:
        """Take the first item of *queue*, waiting for one up to *timeout* seconds.

        Every item is popped by exactly one caller.

        :raises BrokerTimeout: the queue stayed empty.
        """
        return self._run(_flows.pop(queue, timeout))

    def status(self) -> dict[str, Any]:
        """Who holds what and who waits for what (what ``corral status`` prints).

        ``{"holders": [...], "waiters": [...], "sessions": [...], "time": EPOCH_S}``;
        each entry has ``kind``, ``name``, ``who`` (``pid``, ``worker``, ``session``...),
        ``since`` (epoch seconds) and, for holders, ``ttl_left`` (seconds or None).
        """
        return self._run(_flows.status())

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

    def _run(
        self,
        flow: Generator[Call | Compute, Any, T],
        here: bool = False,
        compute: Callable[[], Any] | None = None,
    ) -> T:
        if self._closed:
            raise BrokerUnavailable("this Client is closed")
        try:
            call = next(flow)  # validates arguments before anything is sent
        except StopIteration as stop:  # pragma: no cover - every flow sends something
            return stop.value  # type: ignore[no-any-return]
        if isinstance(call, Call) and call.wait and not here:
            spare = self._checkout()
            try:
                return spare._drive(flow, call)
            finally:
                self._checkin(spare)
        return self._drive(flow, call, compute)

    def _drive(
        self,
        flow: Generator[Call | Compute, Any, T],
        call: Call | Compute,
        compute: Callable[[], Any] | None = None,
    ) -> T:
        """Run *flow* from *call* on this connection; errors are thrown into the flow,
        which may answer them (a failed ``once`` reports its error) or let them out."""
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            try:
                while True:
                    if isinstance(call, Compute):
                        assert compute is not None
                        try:
                            value = compute()
                        except BaseException as exc:
                            call = flow.throw(exc)
                        else:
                            call = flow.send(value)
                        continue
                    try:
                        self._ensure()
                        response = self._roundtrip(call)
                    except BaseException as exc:
                        # Failed or interrupted mid-request (Ctrl-C): a late answer would
                        # be taken for the next request's, so this connection is done.
                        self._drop()
                        call = flow.throw(exc)
                        continue
                    call = flow.send(response)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]

    def _checkout(self) -> Client:
        """An extra connection of this client for a request that waits.

        A wait never holds up other threads' requests on the main connection (nor the
        release of a lock another thread holds), and what it is granted belongs to that
        connection until given back, so the connection is not reused meanwhile.
        """
        with self._spare_lock:
            if self._closed:
                raise BrokerUnavailable("this Client is closed")
            spare = self._spares.pop() if self._spares else None
            if spare is None:
                spare = Client(
                    self.path,
                    self._secret,
                    self.timeout,
                    compress_threshold=self.compress_threshold,
                )
            self._busy.add(spare)
            return spare

    def _checkin(self, spare: Client) -> None:
        with self._spare_lock:
            self._busy.discard(spare)
            if self._closed or len(self._spares) >= _MAX_SPARES:
                spare.close()
            else:
                self._spares.append(spare)

    def _abort(self) -> None:
        """Cut the connection under a thread that waits on it (without its lock)."""
        sock = self._sock
        if sock is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def _hold(
        self, kind: str, name: str, ttl: float | None, timeout: float | None
    ) -> Iterator[Any]:
        spare = self._checkout()  # holds the grant: given back on the same connection
        try:
            grant = spare._run(_flows.take(kind, name, ttl, timeout), here=True)
            try:
                yield grant.token if kind == "lock" else grant.value
            except BaseException:
                with contextlib.suppress(BrokerError):
                    if not spare._run(_flows.give_back(grant), here=True):
                        log.warning("%s %r was already freed when its holder failed", kind, name)
                raise
            if not spare._run(_flows.give_back(grant), here=True):
                raise _flows.claim_lost(grant)
        finally:
            self._checkin(spare)

    def _ensure(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            return
        if self._sock is not None:  # forked: the parent keeps its connection
            self._drop()
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
        timeout = timeout_for(call, self.timeout)
        # A wait keeps the socket's usual timeout (no setsockopt churn per lock) and
        # _receive retries reads until the wait's own deadline.
        self._set_timeout(sock, self.timeout if call.wait or timeout is None else timeout)
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
                f"could not send to the broker at {self.path} in {self.timeout} s"
            ) from exc
        except OSError as exc:
            self._drop()
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
                self._drop()
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
