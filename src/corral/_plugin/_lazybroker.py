"""The run's local broker, started at its first connection.

A run without a database may never talk to its broker, yet every such run would import
and compile the asyncio server (~70 ms without a bytecode cache). The socket is bound
and exported at start-up, so the path is known before any worker exists; a thread
sleeps in ``select`` until something connects, then hands the listening socket to a
:class:`~corral.broker.Broker`. The connecting client's first request waits in the
socket's backlog meanwhile, so it sees no difference.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import socket
import threading
from typing import TYPE_CHECKING, Any

from corral.broker._socketfile import BACKLOG, bind_private, cleanup_files

if TYPE_CHECKING:
    from corral.broker.server import Broker

__all__ = ["LazyBroker"]

log = logging.getLogger("corral.pytest")

# How long stop() waits for a broker being started at that moment.
_START_TIMEOUT = 30.0


class LazyBroker:
    """A :class:`~corral.broker.Broker` whose server starts when a client connects.

    :param options: the ``Broker`` constructor's arguments.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._files: tuple[str, int, str] | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._saved: str | None = None
        self.broker: Broker | None = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        """Whether the server was started (somebody connected) and still serves."""
        broker = self.broker
        return broker is not None and broker.running

    def start(self) -> str:
        """Bind the socket, export ``EPHEMERAL_PIPE``, wait for a connection on a thread.

        :raises BrokerError: the socket cannot be created.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._files = bind_private(sock)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            if self._files is not None:
                cleanup_files(*self._files)
            raise
        self._sock = sock
        self._wake = os.pipe()
        path = self._files[0]
        self._saved = os.environ.get("EPHEMERAL_PIPE")
        os.environ["EPHEMERAL_PIPE"] = path
        atexit.register(self._cleanup_files)
        self._thread = threading.Thread(
            target=self._wait, name="corral-broker-waiting", daemon=True
        )
        self._thread.start()
        return path

    def _wait(self) -> None:
        assert self._sock is not None
        assert self._wake is not None
        assert self._files is not None
        listening = self._sock.fileno()
        try:
            ready, _, _ = select.select([listening, self._wake[0]], [], [])
        except (OSError, ValueError):
            return
        with self._lock:
            if self._stopping or listening not in ready:
                return
            try:
                from corral.broker.server import Broker

                # Set first: it answers requests (and is running) before _serve_bound returns.
                self.broker = Broker(**self._options)
                self.broker._serve_bound(self._sock, *self._files)
            except BaseException as exc:  # the clients see a closed socket
                log.error("corral: the run's broker failed to start: %s", exc)
                self.broker = None
                self.error = exc
                self._sock.close()
                return
            self._sock = None  # the broker's now, and so are its files
            atexit.unregister(self._cleanup_files)
            log.info("broker listening on %s (first connection)", self._files[0])

    def holdings(self) -> list[dict[str, Any]]:
        """What clients hold in the broker (nothing when it never started)."""
        broker = self.broker
        return broker.holdings() if broker is not None and broker.running else []

    def stop(self) -> None:
        """Stop the broker, or the wait for its first connection; remove the files. Idempotent."""
        with self._lock:
            self._stopping = True
            wake, self._wake = self._wake, None
        if wake is not None:
            os.write(wake[1], b"x")
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(_START_TIMEOUT)
        if wake is not None:
            for fd in wake:
                os.close(fd)
        # The variable first: the broker's stop() would remove it (it did not set it, so
        # it has nothing to put back).
        if self._files is not None and os.environ.get("EPHEMERAL_PIPE") == self._files[0]:
            if self._saved is None:
                os.environ.pop("EPHEMERAL_PIPE", None)
            else:
                os.environ["EPHEMERAL_PIPE"] = self._saved
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._cleanup_files()
            atexit.unregister(self._cleanup_files)
        self._files = None

    def _cleanup_files(self) -> None:
        if self._files is not None:
            cleanup_files(*self._files)
