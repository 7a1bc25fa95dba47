"""The broker's state as pure logic: keys with TTLs, leases, owners, FIFO waiter tickets.

Time comes from an injected clock and every timer lives in one deadline heap, so tests
drive it with a fake clock and the server only asks "when is the next deadline?".
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Unpack

from corral.broker._coord import Coordination, describe
from corral.broker._holds import Put, value_size
from corral.broker._ticket import KV as _KV
from corral.broker._ticket import LEASE as _LEASE
from corral.broker._ticket import TICKET as _TICKET
from corral.broker._ticket import Clock, Owner, Refused, Ticket, Waiter

__all__ = ["COUNTER_MAX", "COUNTER_MIN", "Refused", "Store", "Ticket", "Waiter"]

# Rough CPython sizes, for ``approximateStoreBytes`` without walking values.
_ITEM_OVERHEAD: Final = 360
#: The counters' range: signed 64-bit, like Redis ``INCRBY`` (and so Node's safe reading
#: of it is the client's business, not a broker that answers ``internal_error``).
COUNTER_MIN: Final = -(2**63)
COUNTER_MAX: Final = 2**63 - 1


@dataclass(slots=True, eq=False)
class _Entry:
    key: str
    value: Any
    compressed: bool
    deadline: float
    seq: int
    size: int


@dataclass(slots=True, eq=False)
class _Lease:
    worker: Hashable
    key: str
    value: int
    deadline: float
    seq: int
    owner: Owner
    since: float = 0.0  # store clock when first taken (renewals keep it): its age
    #: fencing token: increases per key with every new lease
    token: int = field(default=0, init=False)
    who: dict[str, Any] | None = field(default=None, init=False)


class Store(Coordination):
    """All broker state; pure, single-threaded, driven by the server's event loop.

    :param clock: monotonic seconds; every deadline is on this clock.
    :param wall: epoch seconds, only to report ``expires`` to clients (default: *clock*).
    :param require_ttl: refuse ``set`` without a TTL (``ttl_required``).
    :param default_ttl: seconds, for keys and leases set without a TTL.
    :param max_items: most things held at once (0 = unlimited): keys, pools, locks,
        barriers, throttles, ``once`` claims and failures, queued items. Updates of
        existing keys always succeed.
    :param max_value_size: most characters in a value's JSON (a pool's items too).
    :param max_bytes: most bytes held by all of those, by :attr:`approx_bytes`
        (0 = unlimited); beyond it, requests that would add are refused ``max_items``.
    :param tombstone_ttl: seconds a key that expired on its deadline is still reported
        as ``expired`` (not ``not_found``) by ``get``; bounded by :meth:`compact`.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        wall: Clock | None = None,
        require_ttl: bool = True,
        default_ttl: float = 1800.0,
        max_items: int = 10_000,
        max_value_size: int = 256 * 1024,
        tombstone_ttl: float = 30.0,
        max_bytes: int = 0,
    ) -> None:
        self.clock = clock
        self.tombstone_ttl = tombstone_ttl
        self.wall = wall or clock
        self.require_ttl = require_ttl
        self.default_ttl = default_ttl
        self.max_items = max_items
        self.max_value_size = max_value_size
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self) -> None:
        self._data: dict[str, _Entry] = {}
        # Keys the deadline timer removed: key -> deadline, so get() can say "expired".
        self._expired: dict[str, float] = {}
        self._leases: dict[Hashable, _Lease] = {}
        self._leased: dict[str, dict[int, Hashable]] = {}
        self._owned: dict[Owner, set[tuple[int, Hashable]]] = {}
        self._queues: dict[str, deque[Ticket]] = {}
        self._heap: list[tuple[float, int, int, Any]] = []
        self._stale = 0  # heap entries known to be dead
        self._seq = 0
        self._key_bytes = 0
        self._lease_fences: dict[str, int] = {}
        self.expired_items = 0
        self.expired_leases = 0
        self._reset_coordination()

    # ------------------------------------------------------------------ deadlines

    def _push(self, deadline: float, kind: int, ref: Any) -> int:
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, kind, ref))
        return self._seq

    def next_deadline(self) -> float | None:
        """The earliest pending deadline on the clock (maybe a stale one), or None."""
        return self._heap[0][0] if self._heap else None

    def expire_due(self) -> int:
        """Act on every deadline that has passed; return how many things expired."""
        heap = self._heap
        if not heap:
            return 0
        now = self.clock()
        done = 0
        while heap and heap[0][0] <= now:
            _, seq, kind, ref = heapq.heappop(heap)
            if ref.seq != seq:
                self._stale -= 1
                continue
            done += 1
            if kind == _KV:
                self._drop(ref)
                self._expired[ref.key] = ref.deadline
                self.expired_items += 1
            elif kind == _LEASE:
                self._drop_lease(ref)
                self.expired_leases += 1
            elif kind == _TICKET:
                self._ticket_timed_out(ref)
            else:
                self._coord_due(kind, ref)
        return done

    def prune_waiters(self) -> int:
        """Drop tickets that timed out or left from their FIFO queues; how many.

        They are skipped lazily when popped; this bounds a queue nobody serves (pops that
        keep timing out). Run from the periodic sweep, never inside another operation.
        """
        dropped = 0
        for name, queue in list(self._queues.items()):
            live = deque(t for t in queue if t.waiting)
            dropped += len(queue) - len(live)
            if live:
                self._queues[name] = live
            else:
                del self._queues[name]
        return dropped

    def compact(self) -> None:
        """Drop stale heap entries (replaced keys, released leases) and old tombstones."""
        if self._expired:
            horizon = self.clock() - self.tombstone_ttl
            self._expired = {k: d for k, d in self._expired.items() if d > horizon}
        if self._stale:
            self._heap = [e for e in self._heap if e[3].seq == e[1]]
            heapq.heapify(self._heap)
            self._stale = 0

    def _retire(self, ref: Any) -> None:
        ref.seq = 0  # its heap entry is dead now
        self._stale += 1
        if self._stale > 1024 and self._stale * 2 > len(self._heap):
            self.compact()

    # ------------------------------------------------------------------ limits

    @property
    def item_count(self) -> int:
        """Things held, in O(1): keys (expired ones until their deadline fires), pools,
        locks, barriers, throttles, ``once`` states and queued items."""
        return len(self._data) + self._coord_items()

    @property
    def approx_bytes(self) -> int:
        """Roughly the bytes all of it takes (``approximateStoreBytes``), in O(1)."""
        return self._key_bytes + self._coord_bytes()

    def admit(self, items: int, size: int, what: str) -> None:
        """Refuse (``max_items``) adding *items* things of *size* bytes beyond the limits.

        Expired keys are dropped first: they do not count against the limits.
        """
        over = self._over(items, size)
        if over:
            self.expire_due()
            over = self._over(items, size)
        if over:
            raise Refused("max_items", f"{what}: the broker holds {over}; free some or raise it")

    def _over(self, items: int, size: int) -> str:
        if items > 0 and self.max_items > 0 and self.item_count + items > self.max_items:
            return f"max_items={self.max_items} things (keys, pools, locks, queued items...)"
        if size > 0 and self.max_bytes > 0 and self.approx_bytes + size > self.max_bytes:
            return f"about {self.approx_bytes} bytes and max_bytes={self.max_bytes}"
        return ""

    def resolve_ttl(self, ttl: float | None, *, required: bool = False) -> float:
        """Seconds to live for a request's *ttl* (seconds, ``None`` when absent).

        :raises Refused: ``ttl_required`` or ``invalid_ttl``.
        """
        if ttl is None:
            if required:
                raise Refused("ttl_required", "this broker requires a ttl on every key")
            return self.default_ttl
        if not math.isfinite(ttl) or ttl < 0:
            raise Refused("invalid_ttl", f"ttl must be a positive number, got {ttl!r}")
        if ttl == 0:
            if required:
                raise Refused("invalid_ttl", "ttl must be positive")
            return self.default_ttl
        return ttl

    # ------------------------------------------------------------------ keys

    def get(self, key: str) -> _Entry:
        """The live entry for *key*.

        :raises Refused: ``not_found``, or ``expired`` (the entry is dropped).
        """
        entry = self._data.get(key)
        if entry is None:
            if self._expired and self._expired.pop(key, None) is not None:
                raise Refused("expired")
            raise Refused("not_found")
        if entry.deadline <= self.clock():
            self._drop(entry)
            self.expired_items += 1
            raise Refused("expired")
        return entry

    def live_entry(self, key: str) -> _Entry | None:
        """The live entry for *key*, or None (an expired one is dropped)."""
        entry = self._data.get(key)
        if entry is not None and entry.deadline <= self.clock():
            self._drop(entry)
            self.expired_items += 1
            return None
        return entry

    def add(self, key: str, value: Any, **options: Unpack[Put]) -> bool:
        """Store *value* under *key* only if no live value is there; True when stored.

        :raises Refused: as :meth:`set`.
        """
        if self.live_entry(key) is not None:
            ttl = options.get("ttl")
            self.resolve_ttl(ttl, required=self.require_ttl)  # same validation either way
            return False
        self.set(key, value, **options)
        return True

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add *amount* to the integer at *key* (a missing key counts as 0); the result.

        A new counter lives *ttl* seconds (the default TTL when None: counters are
        coordination state, so ``require_ttl`` does not apply); an existing one keeps
        its deadline unless *ttl* is given.

        :raises Refused: ``bad_request`` when the value there is not an integer,
            ``overflow`` when it or the result is outside the signed 64-bit range
            (:data:`COUNTER_MIN`..:data:`COUNTER_MAX`); the key is unchanged then.
        """
        if ttl is not None:
            self.resolve_ttl(ttl)  # before anything changes
        if not COUNTER_MIN <= amount <= COUNTER_MAX:
            raise Refused("overflow", "the amount is outside the signed 64-bit range")
        entry = self.live_entry(key)
        if entry is None:
            self.set(key, amount, ttl=self.default_ttl if ttl is None else ttl, size=5)
            return amount
        if type(entry.value) is not int or entry.compressed:
            raise Refused("bad_request", f"the value of {key!r} is not an integer")
        if not COUNTER_MIN <= entry.value <= COUNTER_MAX:
            raise Refused("overflow", f"{key!r} holds an integer outside the signed 64-bit range")
        value = entry.value + amount
        if not COUNTER_MIN <= value <= COUNTER_MAX:
            raise Refused("overflow", f"incr of {key!r} would leave the signed 64-bit range")
        entry.value = value
        if ttl is not None:
            self.set(key, value, ttl=ttl, size=5)
        return value

    def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        compressed: bool = False,
        size: int = 0,
    ) -> None:
        """Store *value* under *key* for *ttl* seconds.

        :param size: the value's JSON length when the caller knows it cheaply, used
            for the size limit and memory accounting; 0 means measure it here.
        :raises Refused: ``ttl_required``, ``invalid_ttl``, ``too_large``, ``max_items``.
        """
        seconds = self.resolve_ttl(ttl, required=self.require_ttl)
        if size <= 0 or size > self.max_value_size:
            size = value_size(value)
        if size > self.max_value_size:
            raise Refused(
                "too_large", f"value is {size} characters; max_value_size is {self.max_value_size}"
            )
        now = self.clock()
        old = self._data.get(key)
        if self._expired:
            self._expired.pop(key, None)
        if old is not None and old.deadline <= now:
            self._drop(old)
            self.expired_items += 1
            old = None
        if old is None:
            self.admit(1, size + len(key) + _ITEM_OVERHEAD, f"key {key!r}")
        elif size > old.size and self.max_bytes > 0:
            self.admit(0, size - old.size, f"key {key!r}")
        deadline = now + seconds
        if old is not None:
            self._retire(old)
            self._key_bytes += size - old.size
            old.value = value
            old.compressed = compressed
            old.size = size
            old.deadline = deadline
            old.seq = self._push(deadline, _KV, old)
            return
        entry = _Entry(key, value, compressed, deadline, 0, size)
        entry.seq = self._push(deadline, _KV, entry)
        self._data[key] = entry
        self._key_bytes += size + len(key) + _ITEM_OVERHEAD

    def delete(self, key: str) -> bool:
        """Remove *key*; True when a live key was removed."""
        entry = self._data.get(key)
        if entry is None:
            if self._expired:
                self._expired.pop(key, None)
            return False
        self._drop(entry)
        return entry.deadline > self.clock()

    def _drop(self, entry: _Entry) -> None:
        del self._data[entry.key]
        self._key_bytes -= entry.size + len(entry.key) + _ITEM_OVERHEAD
        self._retire(entry)

    def listing(self) -> dict[str, dict[str, Any]]:
        """``{key: {"expires": epoch_ms, "hasValue": bool}}`` of live keys."""
        now = self.clock()
        offset = self.wall() - now
        return {
            key: {"expires": round((e.deadline + offset) * 1000), "hasValue": e.value is not None}
            for key, e in self._data.items()
            if e.deadline > now
        }

    def keys(self) -> Iterator[str]:
        now = self.clock()
        return (k for k, e in self._data.items() if e.deadline > now)

    @property
    def key_count(self) -> int:
        """Keys held, counted in O(1) (expired ones count until their deadline fires)."""
        return len(self._data)

    # ------------------------------------------------------------------ leases

    def lease(
        self,
        key: str,
        worker: Hashable,
        ttl: float | None,
        owner: Owner = None,
        who: dict[str, Any] | None = None,
    ) -> int:
        """Lease the smallest free integer under *key* to *worker* (Node semantics).

        A worker that holds a lease on *key* renews it and keeps its value.

        :param owner: the connection that asked; when not None the lease is freed as
            soon as that connection closes (see :meth:`release_owner`).
        :raises Refused: ``worker_already_has_lease`` or ``invalid_ttl``.
        """
        seconds = self.resolve_ttl(ttl)
        now = self.clock()
        lease = self._leases.get(worker)
        if lease is not None and lease.deadline <= now:
            self._drop_lease(lease)
            self.expired_leases += 1
            lease = None
        if lease is not None:
            if lease.key != key:
                raise Refused(
                    "worker_already_has_lease",
                    f"worker {worker!r} holds a lease on {lease.key!r}; release it first",
                )
            self._retire(lease)
            lease.deadline = now + seconds
            lease.seq = self._push(lease.deadline, _LEASE, lease)
            if owner is not None and lease.owner is None:
                lease.owner = owner
                self._owned.setdefault(owner, set()).add((_LEASE, worker))
            return lease.value
        for holder in list(self._leased.get(key, {}).values()):
            old = self._leases[holder]
            if old.deadline <= now:  # expired holders free their number now
                self._drop_lease(old)
                self.expired_leases += 1
        taken = self._leased.setdefault(key, {})
        value = 0
        while value in taken:
            value += 1
        lease = _Lease(worker, key, value, now + seconds, 0, owner, since=now)
        lease.token = self._lease_fences[key] = self._lease_fences.get(key, 0) + 1
        lease.who = who
        lease.seq = self._push(lease.deadline, _LEASE, lease)
        self._leases[worker] = lease
        taken[value] = worker
        if owner is not None:
            self._owned.setdefault(owner, set()).add((_LEASE, worker))
        return value

    def release(self, worker: Hashable) -> bool:
        """Free *worker*'s lease; True when it held a live one."""
        lease = self._leases.get(worker)
        if lease is None:
            return False
        self._drop_lease(lease)
        return lease.deadline > self.clock()

    def _drop_lease(self, lease: _Lease) -> None:
        del self._leases[lease.worker]
        taken = self._leased[lease.key]
        del taken[lease.value]
        if not taken:
            del self._leased[lease.key]
        if lease.owner is not None:
            held = self._owned.get(lease.owner)
            if held is not None:
                held.discard((_LEASE, lease.worker))
        self._retire(lease)

    @property
    def lease_count(self) -> int:
        return len(self._leases)

    def lease_token(self, worker: Hashable) -> int:
        """The fencing token of *worker*'s lease (0 when it holds none)."""
        lease = self._leases.get(worker)
        return lease.token if lease is not None else 0

    def leases(self) -> dict[str, dict[str, Any]]:
        """``{worker: {"key", "value", "expires", "since", "owner", "token", "who"}}``.

        ``expires``/``since`` are wall-clock milliseconds; ``owner`` is the holding
        connection (None for one-shot clients). For status dumps and end-of-run reports.
        """
        now = self.clock()
        offset = self.wall() - now
        return {
            str(w): {
                "key": lease.key,
                "value": lease.value,
                "expires": round((lease.deadline + offset) * 1000),
                "since": round((lease.since + offset) * 1000),
                "owner": lease.owner,
                "token": lease.token,
                "who": lease.who,
            }
            for w, lease in self._leases.items()
            if lease.deadline > now
        }

    # ------------------------------------------------------------------ waiters

    def enqueue(self, ticket: Ticket, timeout: float | None = None) -> None:
        """Queue *ticket* (FIFO per ``ticket.name``); it fails ``timeout`` after *timeout* s."""
        self._queues.setdefault(ticket.name, deque()).append(ticket)
        if ticket.owner is not None:
            self._owned.setdefault(ticket.owner, set()).add((_TICKET, ticket))
        if timeout is not None:
            ticket.deadline = self.clock() + timeout
            ticket.seq = self._push(ticket.deadline, _TICKET, ticket)

    def next_waiter(self, name: str) -> Ticket | None:
        """Pop the first ticket still waiting on *name* (dead ones are discarded)."""
        queue = self._queues.get(name)
        while queue:
            ticket = queue.popleft()
            if ticket.waiting:
                if not queue:
                    del self._queues[name]
                self._forget_ticket(ticket)
                return ticket
        self._queues.pop(name, None)
        return None

    def waiters(self, name: str) -> list[Ticket]:
        return [t for t in self._queues.get(name, ()) if t.waiting]

    def _forget_ticket(self, ticket: Ticket) -> None:
        if ticket.seq:
            self._retire(ticket)
        if ticket.owner is not None:
            held = self._owned.get(ticket.owner)
            if held is not None:
                held.discard((_TICKET, ticket))

    def _ticket_timed_out(self, ticket: Ticket) -> None:
        ticket.seq = 0
        if ticket.owner is not None:
            held = self._owned.get(ticket.owner)
            if held is not None:
                held.discard((_TICKET, ticket))
        if ticket.fail("timeout", f"gave up waiting for {ticket.kind} {ticket.label!r}") and (
            ticket.abandon is not None
        ):
            ticket.abandon(ticket, f"member {describe(ticket.who)} timed out")

    # ------------------------------------------------------------------ ownership

    def cancel(self, ticket: Ticket, reason: str) -> bool:
        """The waiter of *ticket* went away (disconnect, cancellation): never grant it.

        Runs the ticket's ``abandon`` hook (a barrier breaks). False when it was decided.
        """
        if not ticket.cancel():
            return False
        if ticket.seq:
            self._retire(ticket)
        self._alarms.pop(ticket, None)
        if ticket.owner is not None:
            held = self._owned.get(ticket.owner)
            if held is not None:
                held.discard((_TICKET, ticket))
        if ticket.abandon is not None:
            ticket.abandon(ticket, reason)
        return True

    def release_owner(self, owner: Owner, reason: str = "its connection closed") -> int:
        """Free everything *owner* (a connection) holds and cancel its tickets.

        Called when the connection closes, so a crashed process releases its claims
        at once instead of after their TTL. Tickets go first, so nothing the owner
        frees is handed to its own waiters. Returns how many things were freed.
        """
        held = self._owned.pop(owner, None)
        if not held:
            return 0
        freed = 0
        ordered = sorted(held, key=lambda entry: entry[0] != _TICKET)
        for kind, ref in ordered:
            if kind == _TICKET:
                assert isinstance(ref, Ticket)
                if self.cancel(ref, reason):
                    freed += 1
            elif kind == _LEASE:
                lease = self._leases.get(ref)
                if lease is not None and lease.owner == owner:
                    self._drop_lease(lease)
                    freed += 1
            elif self._coord_release(kind, ref, owner):
                freed += 1
        return freed

    def holdings(self, owner: Owner) -> int:
        """How many things *owner* holds or waits for."""
        return len(self._owned.get(owner, ()))

    # ------------------------------------------------------------------ all

    def clear(self) -> None:
        """Forget everything (broker stop); waiting tickets fail with ``draining``."""
        for queue in self._queues.values():
            for ticket in queue:
                ticket.fail("draining", "the broker is shutting down")
        for ticket in list(self._alarms):
            ticket.fail("draining", "the broker is shutting down")
        self._reset()
