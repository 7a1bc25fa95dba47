"""Coordination that survives crashes, as pure store logic: once, throttles, barriers
and queues, on top of :mod:`~corral.broker._holds` (locks, pools). Mixed into
:class:`~corral.broker._store.Store`.

Everything held belongs to an owner (a persistent connection) and is freed by
``release_owner``; waiters are FIFO :class:`~corral.broker._ticket.Ticket` objects decided
exactly once; every timer is an entry in the store's one deadline heap.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Unpack

from corral.broker._holds import OVERHEAD, Holds, Put, _Hold, describe, value_size
from corral.broker._ticket import (
    ALARM,
    HOLD,
    ONCE,
    ONE_SHOT,
    TICKET,
    Owner,
    Refused,
    Ticket,
    Waiter,
    Who,
)

__all__ = ["Coordination", "describe"]


class _Once:
    """The state of ``once(key)`` while it is computed, or after its compute failed."""

    __slots__ = ("deadline", "etype", "key", "message", "owner", "seq", "since", "state", "who")

    def __init__(self, key: str, owner: Owner, who: Who, since: float) -> None:
        self.key = key
        self.state = "computing"
        self.owner = owner
        self.who = who
        self.since = since
        self.message = ""
        self.etype = ""
        self.deadline: float | None = None
        self.seq = 0


class _Barrier:
    __slots__ = ("broken", "count", "generation", "name", "parties")

    def __init__(self, name: str, parties: int) -> None:
        self.name = name
        self.parties = parties
        self.count = 0
        self.generation = 0
        self.broken: str | None = None


class Coordination(Holds):
    """The coordination half of the store: locks and pools (:class:`Holds`), once,
    barriers, throttles, work queues, and their status."""

    def _reset_coordination(self) -> None:
        self._reset_holds()
        self._onces: dict[str, _Once] = {}
        self._barriers: dict[str, _Barrier] = {}
        self._throttles: dict[str, deque[float]] = {}
        # queue -> items, each with its rough size in bytes (for max_bytes)
        self._work: dict[str, deque[tuple[Any, int]]] = {}
        self._queued = 0  # items in all queues
        self._queued_bytes = 0
        self._once_bytes = 0  # messages of failed onces
        self._alarms: dict[Ticket, None] = {}  # throttle waiters, granted by the clock

    # ------------------------------------------------------------------ limits

    def _coord_items(self) -> int:
        """Coordination things held, in O(1), for ``max_items``."""
        return (
            len(self._resources)
            + len(self._onces)
            + len(self._barriers)
            + len(self._throttles)
            + self._queued
        )

    def _coord_bytes(self) -> int:
        """Rough bytes of it all, in O(1), for ``max_bytes`` and ``approximateStoreBytes``."""
        small = len(self._resources) + len(self._onces) + len(self._barriers)
        return (
            self._pool_bytes
            + self._queued_bytes
            + self._once_bytes
            + OVERHEAD * (small + len(self._throttles))
        )

    def coordination_objects(self) -> dict[str, int]:
        """What ``max_items`` counts besides keys, by kind (``stats`` ``objects``)."""
        pools = sum(1 for kind, _ in self._resources if kind == "pool")
        return {
            "pools": pools,
            "locks": len(self._resources) - pools,
            "onces": len(self._onces),
            "barriers": len(self._barriers),
            "throttles": len(self._throttles),
            "queued": self._queued,
        }

    # ------------------------------------------------------------------ once

    def once_begin(self, key: str, waiter: Waiter = ONE_SHOT) -> dict[str, Any] | Ticket:
        """The value of *key* if stored, else the compute claim, else a ticket to wait.

        :raises Refused: ``once_failed`` (the compute failed: message and errorType
            ride along), ``timeout`` (being computed and timeout=0).
        """
        entry = self.live_entry(key)
        if entry is not None:
            return _done(entry.value, entry.compressed)
        state = self._onces.get(key)
        if state is not None and state.state == "failed":
            raise _once_failed(state)
        if state is not None:
            return self._wait(f"once\0{key}", "once", key, waiter)
        self.admit(1, OVERHEAD, f"once {key!r}")
        state = self._onces[key] = _Once(key, waiter.owner, waiter.who, self.clock())
        self._claim(state, waiter.owner, waiter.who)
        return {"ok": True, "status": "compute"}

    def _claim(self, state: _Once, owner: Owner, who: Who) -> None:
        state.owner, state.who, state.since = owner, who, self.clock()
        if owner is None:  # a one-shot client: nobody frees its claim on disconnect
            state.deadline = state.since + self.default_ttl
            state.seq = self._push(state.deadline, ONCE, state)
        self._own(owner, ONCE, state)

    def once_done(self, key: str, value: Any, **options: Unpack[Put]) -> dict[str, Any]:
        """Store the computed *value* under *key* and hand it to every waiter.

        If a value is stored already (a replaced computer finished first), that one
        wins and is returned. :raises Refused: as :meth:`set` (size, capacity).
        """
        entry = self.live_entry(key)
        if entry is not None:
            return _done(entry.value, entry.compressed)
        if options.get("ttl") is None:
            options["ttl"] = self.default_ttl
        self.set(key, value, **options)
        self._end_once(key)
        answer = _done(value, options.get("compressed", False))
        while (ticket := self.next_waiter(f"once\0{key}")) is not None:
            ticket.set(answer)
        return {"ok": True, "status": "stored"}

    def once_fail(
        self,
        key: str,
        message: str,
        error_type: str,
        *,
        ttl: float | None = None,
        owner: Owner = None,
    ) -> dict[str, Any]:
        """Record that computing *key* raised; every waiter (and later caller, for *ttl*
        seconds) gets ``once_failed`` with the original message.

        A caller that lost its claim meanwhile (its connection broke, a waiter was
        elected and computes now) does not fail the others: ``superseded``.
        """
        entry = self.live_entry(key)
        if entry is not None:
            return _done(entry.value, entry.compressed)
        current = self._onces.get(key)
        if (
            current is not None
            and current.state == "computing"
            and current.owner is not None
            and current.owner != owner
        ):
            return {"ok": True, "status": "superseded"}
        seconds = self.resolve_ttl(ttl)
        size = len(message) + len(error_type)
        self.admit(0 if current is not None else 1, size + OVERHEAD, f"once {key!r}")
        self._end_once(key)
        state = self._onces[key] = _Once(key, None, None, self.clock())
        state.state, state.message, state.etype = "failed", message, error_type
        self._once_bytes += size
        state.deadline = state.since + seconds
        state.seq = self._push(state.deadline, ONCE, state)
        error = _once_failed(state)
        while (ticket := self.next_waiter(f"once\0{key}")) is not None:
            ticket.fail(error.code, error.detail, **error.extra)
        return {"ok": True, "status": "failed"}

    def once_cancel(self, key: str, owner: Owner = None) -> bool:
        """The computing caller gave up without a result (interrupted): elect a waiter."""
        state = self._onces.get(key)
        if state is None or state.state != "computing" or state.owner != owner:
            return False
        self._give_up(state)
        return True

    def _end_once(self, key: str) -> None:
        state = self._onces.pop(key, None)
        if state is not None:
            self._once_bytes -= len(state.message) + len(state.etype)
            self._disown(state.owner, ONCE, state)
            if state.seq:
                self._retire(state)

    def _give_up(self, state: _Once) -> None:
        """The computer left without a result: the first waiter still waiting computes."""
        self._disown(state.owner, ONCE, state)
        if state.seq:
            self._retire(state)
        ticket = self.next_waiter(f"once\0{state.key}")
        if ticket is None:
            del self._onces[state.key]
            return
        self._claim(state, ticket.owner, ticket.who)
        ticket.set({"ok": True, "status": "compute"})

    # ------------------------------------------------------------------ barrier

    def barrier(
        self, name: str, parties: int, waiter: Waiter = ONE_SHOT
    ) -> dict[str, Any] | Ticket:
        """Arrive at barrier *name*; the last of *parties* arrivals releases the round.

        :raises Refused: ``barrier_broken`` (for good), ``bad_request`` (other parties).
        """
        bar = self._barriers.get(name)
        if bar is None:
            self.admit(1, OVERHEAD, f"barrier {name!r}")
            bar = self._barriers[name] = _Barrier(name, parties)
        if bar.broken is not None:
            raise _broken(bar)
        if bar.parties != parties:
            raise Refused(
                "bad_request", f"barrier {name!r} has {bar.parties} parties, not {parties}"
            )
        index = bar.count
        qname = f"barrier\0{name}"
        if index + 1 >= parties:
            while (ticket := self.next_waiter(qname)) is not None:
                ticket.set({"ok": True, "index": ticket.data})
            bar.count = 0
            bar.generation += 1
            return {"ok": True, "index": index}
        if waiter.timeout == 0:
            self._break(bar, f"member {describe(waiter.who)} would not wait (timeout=0)")
            raise Refused("timeout", f"barrier {name!r}: not all parties arrived and timeout=0")
        bar.count += 1
        ticket = self._wait(qname, "barrier", name, waiter, data=index)
        ticket.abandon = self._barrier_abandoned
        return ticket

    def _barrier_abandoned(self, ticket: Ticket, reason: str) -> None:
        bar = self._barriers.get(ticket.label)
        if bar is not None and bar.broken is None:
            self._break(bar, reason)

    def _break(self, bar: _Barrier, reason: str) -> None:
        bar.broken = reason
        error = _broken(bar)
        while (ticket := self.next_waiter(f"barrier\0{bar.name}")) is not None:
            ticket.fail(error.code, error.detail, **error.extra)

    # ------------------------------------------------------------------ throttle

    def throttle(
        self, name: str, calls: int, per: float, waiter: Waiter = ONE_SHOT
    ) -> dict[str, Any] | Ticket:
        """Reserve the next slot of at most *calls* per *per* seconds under *name*.

        Answered at once when the slot is now, else by a ticket granted when it starts.
        A slot is reserved even if its waiter goes away (the rate is never exceeded).

        :raises Refused: ``timeout`` when the slot starts more than the waiter's timeout
            from now (nothing is reserved then).
        """
        now = self.clock()
        times = self._throttles.get(name)
        if times is None:
            self.admit(1, OVERHEAD, f"throttle {name!r}")
            times = self._throttles[name] = deque()
        at = now
        if len(times) >= calls:
            at = max(now, times[-calls] + per)
        if times:
            at = max(at, times[-1])
        if waiter.timeout is not None and at - now > waiter.timeout:
            raise Refused("timeout", f"throttle {name!r}: the next slot starts in {at - now:.3f} s")
        times.append(at)
        while len(times) > calls:
            times.popleft()
        if at <= now:
            return {"ok": True, "waited": 0}
        ticket = Ticket(
            f"throttle\0{name}", waiter.owner, now, kind="throttle", label=name, who=waiter.who
        )
        ticket.deadline = at
        ticket.seq = self._push(at, ALARM, ticket)
        self._own(waiter.owner, TICKET, ticket)  # cancelled when the owner leaves
        self._alarms[ticket] = None
        return ticket

    # ------------------------------------------------------------------ queues

    def push(self, queue: str, items: list[Any], size: int = 0) -> int:
        """Append *items* to *queue* (waiting poppers get them first); the new length.

        :param size: bytes of the request that carried the items, when known (its share
            per item is their rough size); 0 means measure each item.
        :raises Refused: ``bad_request`` (no items), ``max_items`` (the broker is full).
        """
        if not items:
            raise Refused("bad_request", "push needs at least one item")
        work = self._work.get(queue)
        held = len(work) if work is not None else 0
        length = held + len(items)
        qname = f"pop\0{queue}"
        kept = len(items) - len(self.waiters(qname))  # the rest go straight to poppers
        if size > 0:
            sizes = [max(size // len(items), 5)] * len(items)
        else:
            sizes = [value_size(item) for item in items]
        if kept > 0:
            self.admit(kept, sum(sizes[-kept:]), f"queue {queue!r}")
        pending = deque(zip(items, sizes, strict=True))
        while pending and (ticket := self.next_waiter(qname)) is not None:
            ticket.set({"ok": True, "value": pending.popleft()[0]})
        if pending:
            if work is None:
                work = self._work[queue] = deque()
            work.extend(pending)
            self._queued += len(pending)
            self._queued_bytes += sum(item_size for _, item_size in pending)
        return length

    def pop(self, queue: str, waiter: Waiter = ONE_SHOT) -> dict[str, Any] | Ticket:
        """The first item of *queue*, or a ticket granted by the next push."""
        work = self._work.get(queue)
        if work:
            value, size = work.popleft()
            self._queued -= 1
            self._queued_bytes -= size
            if not work:
                del self._work[queue]
            return {"ok": True, "value": value}
        return self._wait(f"pop\0{queue}", "pop", queue, waiter)

    # ------------------------------------------------------------------ housekeeping

    def _coord_due(self, kind: int, ref: Any) -> None:
        """A coordination deadline passed (called by ``expire_due``)."""
        if kind == HOLD:
            ref.seq = 0
            self._drop_hold(ref)
        elif kind == ALARM:
            ref.seq = 0
            self._alarms.pop(ref, None)
            self._disown(ref.owner, TICKET, ref)
            ref.set({"ok": True, "waited": 1})
        elif kind == ONCE:
            ref.seq = 0
            if ref.state == "failed":
                del self._onces[ref.key]
                self._once_bytes -= len(ref.message) + len(ref.etype)
            else:
                self._give_up(ref)

    def _coord_release(self, kind: int, ref: Any, owner: Owner) -> bool:
        """Free one thing *owner* held (its connection closed); True when freed."""
        if kind == HOLD:
            assert isinstance(ref, _Hold)
            res = self._resources.get((ref.kind, ref.name))
            if res is not None and res.holds.get(ref.token) is ref:
                self._drop_hold(ref)
                return True
        elif kind == ONCE:
            assert isinstance(ref, _Once)
            if self._onces.get(ref.key) is ref and ref.state == "computing" and ref.owner == owner:
                self._give_up(ref)
                return True
        return False

    def coordination_counts(self) -> dict[str, int]:
        holders = sum(len(res.holds) for res in self._resources.values())
        waiting = sum(1 for q in self._queues.values() for t in q if t.waiting)
        return {
            "locks": sum(len(r.holds) for r in self._resources.values() if r.kind == "lock"),
            "holders": holders,
            "waiters": waiting + len(self._alarms),
            "queued": sum(len(w) for w in self._work.values()),
        }

    def coordination_status(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(holders, waiters)``: locks, pool items and compute claims held, and every
        waiter, with who, since (epoch s) and TTL left (s, None when none)."""
        now = self.clock()
        offset = self.wall() - now
        holders: list[dict[str, Any]] = []
        for res in self._resources.values():
            for hold in res.holds.values():
                holders.append(
                    {
                        "kind": res.kind,
                        "name": res.name,
                        "item": hold.item,
                        "value": res.items[hold.item],
                        "token": hold.token,
                        "who": hold.who or {},
                        "since": hold.since + offset,
                        "ttl_left": None if hold.deadline is None else hold.deadline - now,
                        "owned": hold.owner is not None,
                    }
                )
        for state in self._onces.values():
            if state.state == "computing":
                holders.append(
                    {
                        "kind": "once",
                        "name": state.key,
                        "who": state.who or {},
                        "since": state.since + offset,
                        "ttl_left": None if state.deadline is None else state.deadline - now,
                        "owned": state.owner is not None,
                    }
                )
        waiters: list[dict[str, Any]] = []
        tickets = [t for q in self._queues.values() for t in q if t.waiting]
        tickets += [t for t in self._alarms if t.waiting]
        for ticket in tickets:
            waiters.append(
                {
                    "kind": ticket.kind,
                    "name": ticket.label,
                    "who": ticket.who or {},
                    "since": ticket.since + offset,
                    "timeout_left": None if ticket.deadline is None else ticket.deadline - now,
                }
            )
        return holders, waiters


def _done(value: Any, compressed: bool) -> dict[str, Any]:
    return {"ok": True, "status": "done", "value": value, "compressed": compressed}


def _once_failed(state: _Once) -> Refused:
    return Refused(
        "once_failed",
        f"computing {state.key!r} raised {state.etype}: {state.message}",
        message=state.message,
        errorType=state.etype,
    )


def _broken(bar: _Barrier) -> Refused:
    return Refused(
        "barrier_broken", f"barrier {bar.name!r} is broken: {bar.broken}", reason=bar.broken
    )
