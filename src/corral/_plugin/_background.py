"""A piece of the controller's set-up run in a thread while xdist boots the workers, and
joined before the first test: its error is raised there, in the main thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Background"]

# How often a wait wakes up: a join with no timeout is not interruptible everywhere, and
# Ctrl-C must stop a wait for a long build.
_TICK = 0.1


class Background:
    """Run *target* once in a daemon thread (one that hangs must not keep the interpreter
    from exiting); remember how it ended.

    :param target: the work; what it raises is kept and re-raised by :meth:`join`.
    :param name: the thread's name.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; returns at once."""
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # handed to the joining thread
            self._error = exc

    def outcome(self, timeout: float = _TICK) -> bool | None:
        """Wait up to *timeout* seconds: None while it still runs, then whether it worked
        (for other threads waiting on it: the error stays for :meth:`join`)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        return self._error is None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end, at most *timeout* seconds (None: as long as it takes), in
        short steps so that Ctrl-C interrupts it; True when it has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            step = _TICK if deadline is None else min(_TICK, deadline - time.monotonic())
            if step <= 0:
                return False
            self._thread.join(step)
        return True

    def join(self) -> None:
        """Wait for the end (interruptible) and raise its error, the first time only."""
        self.wait()
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    @property
    def error(self) -> BaseException | None:
        """What it raised (None: nothing, or not yet)."""
        return self._error

    @property
    def reported(self) -> bool:
        """Whether :meth:`join` raised its error."""
        return self._reported
