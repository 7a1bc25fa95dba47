"""Locks and pools as pure store logic: items held under fencing tokens, FIFO waiters,
claims freed by release, by their TTL or when their owner's connection closes.

The base of :class:`~corral.broker._coord.Coordination` (mixed into the Store), which
provides the deadline heap, the tickets and the ownership records.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypedDict, Unpack

from corral.broker._ticket import HOLD, ONE_SHOT, Clock, Owner, Refused, Ticket, Waiter, Who

__all__ = ["OVERHEAD", "Holds", "Put", "describe", "pool_size", "value_size"]

#: Rough bytes of one lock, barrier, throttle or ``once`` state, for ``max_bytes``.
OVERHEAD: Final = 400


class Put(TypedDict, total=False):
    """How a value is stored, besides the key and the value (see ``Store.set``)."""

    ttl: float | None
    compressed: bool
    size: int


def value_size(value: Any) -> int:
    """Characters in *value*'s JSON, as Node measures (string length for strings)."""
    if isinstance(value, str):
        return len(value)
    if value is None or isinstance(value, bool | int | float):
        return 5
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def pool_size(name: str, canonical: str) -> int:
    """Rough bytes a declared pool takes: its items twice (parsed and canonical JSON)."""
    return 2 * len(canonical) + len(name) + OVERHEAD


@dataclass(slots=True, eq=False)
class _Hold:
    """A lock or a pool item held by someone; ``token`` is its fencing token."""

    kind: str
    name: str
    item: int
    token: int
    owner: Owner
    who: Who
    since: float
    deadline: float | None
    seq: int = field(default=0, init=False)


class _Resource:
    """A lock (one anonymous item) or a declared pool: items, free list, holders."""

    __slots__ = ("canonical", "free", "holds", "items", "kind", "name", "qname")

    def __init__(self, kind: str, name: str, items: list[Any], canonical: str) -> None:
        self.kind = kind
        self.name = name
        self.items = items
        self.canonical = canonical
        self.free: deque[int] = deque(range(len(items)))
        self.holds: dict[int, _Hold] = {}  # token -> hold
        self.qname = f"{kind}\0{name}"


def describe(who: Who) -> str:
    """``pid 123 (worker gw1)`` for a status ``who``; for reasons and messages."""
    if not who:
        return "a one-shot client"
    text = f"session {who.get('session')}" if who.get("pid") is None else f"pid {who['pid']}"
    if who.get("worker"):
        text += f" (worker {who['worker']})"
    return text


class Holds:
    """Locks and pools, and the helpers every coordination primitive shares (a mixin:
    the Store provides the heap, the tickets, ownership and keys)."""

    if TYPE_CHECKING:  # provided by Store
        clock: Clock
        wall: Clock
        default_ttl: float
        max_items: int
        max_value_size: int
        _owned: dict[Owner, set[tuple[int, Any]]]
        _queues: dict[str, deque[Ticket]]
        _data: dict[str, Any]

        def _push(self, deadline: float, kind: int, ref: Any) -> int: ...
        def _retire(self, ref: Any) -> None: ...
        def enqueue(self, ticket: Ticket, timeout: float | None = None) -> None: ...
        def next_waiter(self, name: str) -> Ticket | None: ...
        def waiters(self, name: str) -> list[Ticket]: ...
        def live_entry(self, key: str) -> Any: ...
        def admit(self, items: int, size: int, what: str) -> None: ...
        def resolve_ttl(self, ttl: float | None, *, required: bool = False) -> float: ...
        def set(self, key: str, value: Any, **options: Unpack[Put]) -> None: ...

    def _reset_holds(self) -> None:
        self._resources: dict[tuple[str, str], _Resource] = {}
        self._fences: dict[tuple[str, str], int] = {}
        self._pool_bytes = 0  # the declared pools' items, as approximateStoreBytes counts

    def _own(self, owner: Owner, kind: int, ref: Any) -> None:
        if owner is not None:
            self._owned.setdefault(owner, set()).add((kind, ref))

    def _disown(self, owner: Owner, kind: int, ref: Any) -> None:
        if owner is not None:
            held = self._owned.get(owner)
            if held is not None:
                held.discard((kind, ref))

    def _wait(self, qname: str, kind: str, label: str, waiter: Waiter, data: Any = None) -> Ticket:
        if waiter.timeout == 0:
            raise Refused("timeout", f"{kind} {label!r} is not available and timeout=0")
        ticket = Ticket(
            qname, waiter.owner, self.clock(), kind=kind, label=label, who=waiter.who, data=data
        )
        self.enqueue(ticket, waiter.timeout)
        return ticket

    def _has_waiters(self, qname: str) -> bool:
        queue = self._queues.get(qname)
        while queue:
            if queue[0].waiting:
                return True
            queue.popleft()
        return False

    # ------------------------------------------------------------------ locks, pools

    def declare_pool(self, name: str, items: list[Any]) -> bool:
        """Declare pool *name* of JSON *items*; True when this call created it.

        :raises Refused: ``pool_conflict`` (declared before with other items),
            ``bad_request`` (no items), ``too_large`` (items over ``max_value_size``),
            ``max_items`` (the broker is full).
        """
        if not items:
            raise Refused("bad_request", f"pool {name!r} needs at least one item")
        canonical = json.dumps(items, sort_keys=True, separators=(",", ":"))
        current = self._resources.get(("pool", name))
        if current is not None:
            if current.canonical == canonical:
                return False
            raise Refused(
                "pool_conflict",
                f"pool {name!r} was declared with {current.canonical[:200]}, not {canonical[:200]}",
            )
        if len(canonical) > self.max_value_size:
            raise Refused(
                "too_large",
                f"pool {name!r}: its items are {len(canonical)} characters of JSON; "
                f"max_value_size is {self.max_value_size}",
            )
        size = pool_size(name, canonical)
        self.admit(1, size, f"pool {name!r}")
        self._resources[("pool", name)] = _Resource("pool", name, list(items), canonical)
        self._pool_bytes += size
        return True

    def acquire(
        self, kind: str, name: str, waiter: Waiter = ONE_SHOT, *, ttl: float | None = None
    ) -> dict[str, Any] | Ticket:
        """Take the lock *name* (``kind="lock"``) or a free item of pool *name*.

        Granted at once when free and nobody queues before us (FIFO: a newcomer never
        overtakes a waiter), else a :class:`Ticket` granted later.

        :param ttl: seconds after which the claim is freed even if still held; None
            means until released, or until the waiter's owner disconnects (for a
            one-shot client, which owns nothing, the default TTL).
        :raises Refused: ``not_found`` (undeclared pool), ``timeout`` (busy, timeout=0).
        """
        res = self._resources.get((kind, name))
        if res is None:
            if kind != "lock":
                raise Refused(
                    "not_found", f"pool {name!r} was never declared: call pool(name, items) first"
                )
            self.admit(1, OVERHEAD, f"lock {name!r}")
            res = self._resources[(kind, name)] = _Resource(kind, name, [None], "lock")
        if res.free and not self._has_waiters(res.qname):
            return self._grant_item(res, res.free.popleft(), waiter.owner, waiter.who, ttl)
        return self._wait(res.qname, kind, name, waiter, data=ttl)

    def _grant_item(
        self, res: _Resource, item: int, owner: Owner, who: Who, ttl: float | None
    ) -> dict[str, Any]:
        key = (res.kind, res.name)
        token = self._fences[key] = self._fences.get(key, 0) + 1
        now = self.clock()
        if ttl is None and owner is None:
            ttl = self.default_ttl  # nobody would free it on disconnect: TTL-only semantics
        hold = _Hold(res.kind, res.name, item, token, owner, who, now, None)
        if ttl is not None:
            hold.deadline = now + ttl
            hold.seq = self._push(hold.deadline, HOLD, hold)
        res.holds[token] = hold
        self._own(owner, HOLD, hold)
        return {"ok": True, "token": token, "item": item, "value": res.items[item]}

    def unhold(self, kind: str, name: str, token: int) -> bool:
        """Free the claim with fencing *token*; False when it was not held any more."""
        res = self._resources.get((kind, name))
        hold = res.holds.get(token) if res is not None else None
        if hold is None:
            return False
        self._drop_hold(hold)
        return True

    def _drop_hold(self, hold: _Hold) -> None:
        res = self._resources[(hold.kind, hold.name)]
        del res.holds[hold.token]
        self._disown(hold.owner, HOLD, hold)
        if hold.seq:
            self._retire(hold)
        # Hand the item to the first waiter still waiting, else back to the free list.
        while True:
            ticket = self.next_waiter(res.qname)
            if ticket is None:
                break
            grant = self._grant_item(res, hold.item, ticket.owner, ticket.who, ticket.data)
            ticket.set(grant)  # a waiting ticket: always decided here
            return
        res.free.append(hold.item)
        if res.kind == "lock" and not res.holds:
            del self._resources[(res.kind, res.name)]  # the fence counter stays
