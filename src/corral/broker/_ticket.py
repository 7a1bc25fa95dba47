"""Waiters and refusals of the broker's store: who waits (:class:`Waiter`) and the FIFO
tickets that are decided exactly once.

Shared by the key/lease store and the coordination primitives (locks, pools, once,
barriers, throttles, queues); pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final, NamedTuple

__all__ = ["ONE_SHOT", "Clock", "Owner", "Refused", "Ticket", "Waiter", "Who"]

Owner = Hashable
Clock = Callable[[], float]
#: Who a holder or waiter is, for status dumps (session, pid, worker...); None: unknown.
Who = dict[str, Any] | None


class Waiter(NamedTuple):
    """Who asks for something that may have to wait, and how long they wait: what every
    waiting operation of the store (acquire, once, barrier, throttle, pop) takes.

    Immutable (:data:`ONE_SHOT` is shared) and built for every such request: a named
    tuple, because a frozen dataclass takes about twice as long to build (one
    ``object.__setattr__`` per field), which the broker's lock round trip would feel.

    :param owner: the connection that asks; what it is granted (or waits for) is freed
        when that connection closes. None for a one-shot client: it owns nothing, so
        its claims live by their TTL alone.
    :param who: who that is, for status dumps and the reasons of errors.
    :param timeout: seconds to wait (0: do not wait; None: forever).
    """

    owner: Owner = None
    who: Who = None
    timeout: float | None = None


#: A one-shot client that waits forever: the waiter when none is named.
ONE_SHOT: Final = Waiter()

# Deadline-heap entry kinds. An entry is (deadline, seq, kind, ref); it is live only while
# ref's current seq equals the entry's seq, so replacing or deleting never searches
# the heap: stale entries are skipped when popped and dropped by compact().
KV: Final = 0  # a key's expiry
LEASE: Final = 1  # a lease's expiry
TICKET: Final = 2  # a waiter's timeout: it fails with "timeout"
HOLD: Final = 3  # a lock/pool item's TTL: freed and handed over
ALARM: Final = 4  # a waiter granted at a time (throttle slots)
ONCE: Final = 5  # a once() failure forgotten, or a one-shot compute claim given up


class Refused(Exception):
    """A request the store will not carry out; ``code`` is the wire error code.

    ``extra`` holds additional answer fields (e.g. the original message of a failed
    ``once``), sent beside ``error`` and ``detail``.
    """

    def __init__(self, code: str, detail: str = "", **extra: Any) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.extra = extra


class Ticket:
    """A waiter in a FIFO queue, woken by whoever frees what it waits for.

    ``set``/``fail``/``cancel`` each return whether they decided the ticket: a ticket
    that timed out, was cancelled or whose owner disconnected is never granted anything
    afterwards (psycopg_pool's ``WaitingClient`` discipline). ``on_done`` is called once,
    when the ticket is decided by ``set`` or ``fail``, so the server can answer.

    ``kind``/``label``/``who`` describe the waiter for status dumps; ``data`` is the
    operation's own payload (a lock's TTL, a barrier arrival's index); ``abandon`` is
    called by the store when the waiter goes away without being granted (timeout,
    cancellation, disconnect), e.g. to break a barrier.
    """

    __slots__ = (
        "abandon",
        "data",
        "deadline",
        "kind",
        "label",
        "name",
        "on_done",
        "owner",
        "result",
        "seq",
        "since",
        "state",
        "who",
    )

    WAITING: Final = "waiting"
    GRANTED: Final = "granted"
    FAILED: Final = "failed"
    CANCELLED: Final = "cancelled"

    def __init__(
        self,
        name: str,
        owner: Owner,
        since: float,
        *,
        kind: str = "wait",
        label: str | None = None,
        who: Who = None,
        data: Any = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self.since = since
        self.kind = kind
        self.label = name if label is None else label
        self.who = who
        self.data = data
        self.deadline: float | None = None
        self.seq = 0
        self.state: str = Ticket.WAITING
        self.result: dict[str, Any] | None = None
        self.on_done: Callable[[Ticket], None] | None = None
        self.abandon: Callable[[Ticket, str], None] | None = None

    @property
    def waiting(self) -> bool:
        return self.state == Ticket.WAITING

    def set(self, result: dict[str, Any]) -> bool:
        """Grant the ticket with *result*; False when it no longer waits."""
        return self._decide(Ticket.GRANTED, result)

    def fail(self, code: str, detail: str = "", **extra: Any) -> bool:
        """Answer the ticket with an error; False when it no longer waits."""
        return self._decide(Ticket.FAILED, {"ok": False, "error": code, "detail": detail, **extra})

    def cancel(self) -> bool:
        """The waiter gave up or went away; nothing is delivered."""
        if self.state != Ticket.WAITING:
            return False
        self.state = Ticket.CANCELLED
        return True

    def _decide(self, state: str, result: dict[str, Any]) -> bool:
        if self.state != Ticket.WAITING:
            return False
        self.state = state
        self.result = result
        if self.on_done is not None:
            self.on_done(self)
        return True

    def __repr__(self) -> str:
        return f"<Ticket {self.name!r} owner={self.owner!r} {self.state}>"
