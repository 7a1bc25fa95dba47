"""Bounded, adaptive busy-polling for the broker's round trips.

On virtual machines (most CI runners) waking a thread that sleeps on another vCPU costs
25-50 µs, several times what the broker spends on a request; a round trip pays it twice.
A reader that polls for a few microseconds before it sleeps skips both wake-ups whenever
the peer answers in time, which turns a 60 µs round trip into well under 10 µs.

Spinning is bounded (``budget`` seconds per wait, then the ordinary blocking wait) and
adaptive: a poller whose spins keep missing (the peer is slower than the budget, or the
machine is overloaded and the peer is not running) stops spinning for a while, so a busy
machine does not lose CPU to it. ``CORRAL_SPIN_US`` sets the budget for a whole run
(``0`` turns spinning off); :data:`DEFAULT_BUDGET` applies otherwise.

Each poll yields the CPU (``sched_yield``): when the scheduler has put both peers on one
CPU, the poller's yield is what lets the other run at all.

Only across processes: a client and a broker in one process (``pytest -n 0`` hosts the
broker on a thread) share the GIL, and a spinning thread would keep the very thread it
waits for from running. Both sides ask the kernel who the peer is (``SO_PEERCRED``) and
never spin for a peer in their own process; where the kernel cannot tell, they do not spin.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import struct
import time
from typing import Final

__all__ = [
    "DEFAULT_BUDGET",
    "SpinPolicy",
    "SpinningSelector",
    "budget_from_env",
    "peer_in_other_process",
    "yield_cpu",
]

DEFAULT_BUDGET: Final = 50e-6
_MISSES_BEFORE_REST: Final = 8  # consecutive misses that pause spinning ...
_REST_WAITS: Final = 64  # ... for this many waits, then spinning is tried again


def budget_from_env(explicit: float | None = None) -> float:
    """The spin budget in seconds: *explicit*, else ``$CORRAL_SPIN_US``, else the default.

    :raises ValueError: the value is negative or not a number.
    """
    if explicit is None:
        raw = os.environ.get("CORRAL_SPIN_US", "").strip()
        if not raw:
            return DEFAULT_BUDGET
        try:
            explicit = float(raw) / 1e6
        except ValueError:
            msg = f"CORRAL_SPIN_US must be a number of microseconds, got {raw!r}"
            raise ValueError(msg) from None
    if not explicit >= 0:
        raise ValueError(f"the spin budget must be >= 0 seconds, got {explicit!r}")
    return float(explicit)


_PEERCRED: Final = getattr(socket, "SO_PEERCRED", None)
_CRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_in_other_process(sock: socket.socket) -> bool:
    """Whether the peer of a connected Unix socket is another process (False: unknown)."""
    if _PEERCRED is None or not hasattr(socket, "MSG_DONTWAIT"):
        return False
    try:
        pid, _, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, _CRED.size))
    except (OSError, struct.error):
        return False
    return bool(pid > 0 and pid != os.getpid())


def yield_cpu() -> None:
    """Let a runnable thread on this CPU go first: the peer we poll for may be that one.

    Without it, a poller that shares its CPU with its peer keeps the peer from running
    until the time slice ends (a 6 µs round trip becomes 110 µs); with it, polling costs
    ~1.5 µs more per round trip when the peer runs elsewhere.
    """
    _sched_yield()


_sched_yield = getattr(os, "sched_yield", lambda: None)


class SpinPolicy:
    """When to spin and for how long: the budget and the miss streak that pauses it.

    Pure bookkeeping (no clock, no I/O): the caller asks :meth:`should_spin`, spins for
    at most :attr:`budget`, then reports :meth:`hit` or :meth:`miss`.
    """

    __slots__ = ("budget", "hits", "missed", "misses", "resting")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.misses = 0  # in a row
        self.resting = 0
        self.hits = 0  # totals, for tests and curiosity
        self.missed = 0

    def should_spin(self) -> bool:
        if self.budget <= 0:
            return False
        if self.resting:
            self.resting -= 1
            return False
        return True

    def hit(self) -> None:
        self.misses = 0
        self.hits += 1

    def miss(self) -> None:
        self.missed += 1
        self.misses += 1
        if self.misses >= _MISSES_BEFORE_REST:
            self.misses = 0
            self.resting = _REST_WAITS


class SpinningSelector(selectors.DefaultSelector):
    """The platform's selector, polling without sleeping for a moment before it sleeps.

    Spins only right after a select that found work from another process (a burst of
    requests is going on); an idle broker sleeps as before. File descriptors in
    :attr:`local` (connections from this very process) never start a spin.
    """

    def __init__(self, budget: float) -> None:
        super().__init__()
        self.policy = SpinPolicy(budget)
        self.local: set[int] = set()
        self._busy = False
        # "Is anything ready?" in one cheap call, where select() builds a list of keys
        # per call (3x the cost): an epoll set holding this selector's own epoll
        # descriptor (fileno()), readable while any registered file is. Level-triggered,
        # so asking consumes nothing. (The selector's epoll object is private.)
        self._outer: select.epoll | None = None
        epoll_selector = getattr(selectors, "EpollSelector", None)
        if epoll_selector is not None and isinstance(self, epoll_selector):
            self._outer = select.epoll()
            self._outer.register(self.fileno(), select.EPOLLIN)
        self._probe = self._outer.poll if self._outer is not None else None

    def close(self) -> None:
        if self._outer is not None:
            self._outer.close()
        super().close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._busy and (timeout is None or timeout > 0) and self.policy.should_spin():
            if self._spin():
                self.policy.hit()
                timeout = 0  # something is ready: collect it without sleeping
            else:
                self.policy.miss()
        ready = super().select(timeout)
        local = self.local
        self._busy = any(key.fd not in local for key, _ in ready)
        return ready

    def stand_down(self) -> None:
        """Do not spin before the next sleep: a waiter was just woken and needs a CPU.

        A lock handed over, a ``once`` value published: the process that waited for it
        must be scheduled now, and on a small machine a polling broker may be holding
        the very CPU it needs (measured: lock handoffs 0.31 ms instead of 0.15-0.23).
        """
        self._busy = False

    def _spin(self) -> bool:
        """Poll until something is ready or the budget is spent; whether something is."""
        probe = self._probe
        clock = time.perf_counter
        end = clock() + self.policy.budget
        while True:
            if probe is not None:
                if probe(0):
                    return True
            elif super().select(0):
                return True
            if clock() >= end:
                return False
            yield_cpu()
