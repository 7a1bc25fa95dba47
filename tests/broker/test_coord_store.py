"""Coordination in the pure store, with a fake clock: locks, pools, once, barriers,
throttles, queues, ownership; and a hypothesis state machine checking the invariants
(capacity, FIFO, fencing, never granting a dead waiter) under random interleavings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from corral.broker._store import Refused, Store, Ticket, Waiter
from tests.broker.test_store import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Store:
    return Store(clock, require_ttl=False, default_ttl=60.0, max_items=100)


def answers(ticket: Ticket | dict[str, Any]) -> list[dict[str, Any]]:
    """Collect what the server would write for *ticket*."""
    assert isinstance(ticket, Ticket), ticket
    out: list[dict[str, Any]] = []

    def done(t: Ticket) -> None:
        assert t.result is not None
        out.append(t.result)

    ticket.on_done = done
    return out


def granted(result: Ticket | dict[str, Any]) -> dict[str, Any]:
    assert isinstance(result, dict), result
    return result


def test_add_and_incr(store: Store, clock: FakeClock) -> None:
    assert store.add("k", "a", ttl=1) is True
    assert store.add("k", "b", ttl=1) is False
    clock.advance(1)
    assert store.add("k", "c", ttl=1) is True  # expired counts as absent
    assert store.incr("n") == 1
    assert store.incr("n", 41) == 42
    assert store.get("n").value == 42
    with pytest.raises(Refused, match="bad_request"):
        store.incr("k")
    assert store.incr("short", ttl=1) == 1
    clock.advance(1)
    assert store.incr("short") == 1


def test_lock_is_fifo_fenced_and_freed_by_owner_or_ttl(store: Store, clock: FakeClock) -> None:
    first = granted(store.acquire("lock", "L", Waiter(owner=1)))
    assert first["token"] == 1
    waits = [store.acquire("lock", "L", Waiter(owner=o)) for o in (2, 3, 4)]
    got = [answers(t) for t in waits]
    with pytest.raises(Refused, match="timeout"):
        store.acquire("lock", "L", Waiter(owner=5, timeout=0))
    assert store.release_owner(3) == 1  # owner 3's ticket: it is never granted
    assert store.unhold("lock", "L", 1) is True
    assert store.unhold("lock", "L", 1) is False  # released once
    assert got[0] == [{"ok": True, "token": 2, "item": 0, "value": None}]
    assert store.release_owner(2) == 1  # the holder's connection closed: handed on at once
    assert got[1] == []
    assert got[2][0]["token"] == 3
    # TTL safety net for a holder that hangs while connected
    store.unhold("lock", "L", 3)
    held = granted(store.acquire("lock", "L", Waiter(owner=6), ttl=5))
    late = answers(store.acquire("lock", "L", Waiter(owner=7, timeout=60)))
    clock.advance(5)
    store.expire_due()
    assert late[0]["token"] == held["token"] + 1
    assert store.unhold("lock", "L", held["token"]) is False  # the hung holder learns it


def test_one_shot_holders_keep_ttl_only_semantics(store: Store, clock: FakeClock) -> None:
    granted(store.acquire("lock", "L"))  # owner None: nobody frees it on disconnect
    assert store.release_owner(None) == 0
    waiting = answers(store.acquire("lock", "L", Waiter(owner=1, timeout=120)))
    clock.advance(59)
    store.expire_due()
    assert waiting == []
    clock.advance(1)  # the default TTL
    store.expire_due()
    assert waiting[0]["ok"] is True


def test_waiter_timeout_is_never_granted(store: Store, clock: FakeClock) -> None:
    granted(store.acquire("lock", "L", Waiter(owner=1)))
    timed = answers(store.acquire("lock", "L", Waiter(owner=2, timeout=1)))
    after = answers(store.acquire("lock", "L", Waiter(owner=3)))
    clock.advance(1)
    store.expire_due()
    assert timed == [{"ok": False, "error": "timeout", "detail": "gave up waiting for lock 'L'"}]
    store.release_owner(1)
    assert timed[1:] == []
    assert after[0]["token"] == 2


def test_pool_declaration_and_acquire(store: Store) -> None:
    assert store.declare_pool("dbs", ["a", "b"]) is True
    assert store.declare_pool("dbs", ["a", "b"]) is False
    with pytest.raises(Refused, match="pool_conflict"):
        store.declare_pool("dbs", ["a"])
    with pytest.raises(Refused, match="not_found"):
        store.acquire("pool", "nope")
    one = granted(store.acquire("pool", "dbs", Waiter(owner=1)))
    two = granted(store.acquire("pool", "dbs", Waiter(owner=2)))
    assert {one["value"], two["value"]} == {"a", "b"}
    third = answers(store.acquire("pool", "dbs", Waiter(owner=3)))
    store.release_owner(1)
    assert third[0]["value"] == one["value"]


def test_once_elects_a_waiter_when_the_computer_leaves(store: Store) -> None:
    assert granted(store.once_begin("k", Waiter(owner=1))) == {"ok": True, "status": "compute"}
    w2 = answers(store.once_begin("k", Waiter(owner=2)))
    w3 = answers(store.once_begin("k", Waiter(owner=3)))
    store.release_owner(1)
    assert w2 == [{"ok": True, "status": "compute"}]
    assert w3 == []
    assert store.once_done("k", {"v": 1}) == {"ok": True, "status": "stored"}
    assert w3 == [{"ok": True, "status": "done", "value": {"v": 1}, "compressed": False}]
    assert granted(store.once_begin("k", Waiter(owner=4)))["value"] == {"v": 1}
    assert store.release_owner(2) == 0  # the claim ended with the value


def test_once_failure_reaches_waiters_and_later_callers(store: Store, clock: FakeClock) -> None:
    store.once_begin("k", Waiter(owner=1))
    waiter = answers(store.once_begin("k", Waiter(owner=2)))
    assert store.once_fail("k", "late", "E", owner=9) == {"ok": True, "status": "superseded"}
    store.once_fail("k", "boom", "RuntimeError", ttl=10, owner=1)
    assert waiter[0]["error"] == "once_failed"
    assert waiter[0]["message"] == "boom"
    assert waiter[0]["errorType"] == "RuntimeError"
    with pytest.raises(Refused) as failed:
        store.once_begin("k", Waiter(owner=3))
    assert failed.value.extra == {"message": "boom", "errorType": "RuntimeError"}
    clock.advance(10)
    store.expire_due()  # the failure is forgotten after its ttl: a new run may retry
    assert granted(store.once_begin("k", Waiter(owner=3)))["status"] == "compute"


def test_barrier_breaks_when_a_member_leaves(store: Store) -> None:
    first = answers(store.barrier("b", 3, Waiter(owner=1)))
    second = answers(store.barrier("b", 3, Waiter(owner=2)))
    store.release_owner(2, "member pid 2 disconnected (it exited or died)")
    assert second == []  # the leaver gets nothing
    assert first[0]["error"] == "barrier_broken"
    assert "pid 2" in first[0]["reason"]
    with pytest.raises(Refused, match="barrier_broken"):
        store.barrier("b", 3, Waiter(owner=3))


def test_barrier_rounds(store: Store) -> None:
    a = answers(store.barrier("b", 2, Waiter(owner=1)))
    assert granted(store.barrier("b", 2, Waiter(owner=2))) == {"ok": True, "index": 1}
    assert a == [{"ok": True, "index": 0}]
    answers(store.barrier("b", 2, Waiter(owner=1)))
    with pytest.raises(Refused, match="bad_request"):
        store.barrier("b", 3, Waiter(owner=2))


def test_throttle_spaces_slots_on_the_clock(store: Store, clock: FakeClock) -> None:
    assert granted(store.throttle("api", 2, 1.0)) == {"ok": True, "waited": 0}
    assert granted(store.throttle("api", 2, 1.0))["ok"]
    third = answers(store.throttle("api", 2, 1.0, Waiter(owner=1)))
    with pytest.raises(Refused, match="timeout"):
        store.throttle("api", 2, 1.0, Waiter(timeout=0.5))  # its slot would start in 1 s
    clock.advance(0.999)
    store.expire_due()
    assert third == []
    clock.advance(0.001)
    store.expire_due()
    assert third == [{"ok": True, "waited": 1}]


def test_queue_hands_items_to_waiters_first(store: Store) -> None:
    waiter = answers(store.pop("q", Waiter(owner=1)))
    gone = answers(store.pop("q", Waiter(owner=2)))
    store.release_owner(2)
    assert store.push("q", [1, 2, 3]) == 3
    assert waiter == [{"ok": True, "value": 1}]
    assert gone == []
    assert granted(store.pop("q"))["value"] == 2
    assert granted(store.pop("q"))["value"] == 3
    with pytest.raises(Refused, match="timeout"):
        store.pop("q", Waiter(timeout=0))


def test_status_lists_holders_and_waiters(store: Store, clock: FakeClock) -> None:
    who = {"pid": 1, "worker": "gw0", "session": 1}
    store.acquire("lock", "L", Waiter(owner=1, who=who), ttl=30)
    store.acquire("lock", "L", Waiter(owner=2, who={"pid": 2}, timeout=10))
    store.once_begin("setup", Waiter(owner=1, who=who))
    clock.advance(2)
    holders, waiters = store.coordination_status()
    lock = next(h for h in holders if h["kind"] == "lock")
    assert lock["who"] == who
    assert lock["ttl_left"] == 28
    assert {h["kind"] for h in holders} == {"lock", "once"}
    assert waiters[0]["kind"] == "lock"
    assert waiters[0]["timeout_left"] == 8


# ---------------------------------------------------------------------- state machine


class CoordinationMachine(RuleBasedStateMachine):
    """Random interleavings of acquire/release/disconnect/timeouts on a pool and a lock.

    A model tracks what each ticket was answered; the invariants are the issue's: a
    pool never has more holders than items, tokens only grow, FIFO order is kept among
    live waiters, and a ticket that timed out or whose owner left is never granted.
    """

    OWNERS = st.integers(min_value=1, max_value=6)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = Store(self.clock, require_ttl=False, default_ttl=50.0)
        self.store.declare_pool("P", ["x", "y"])
        self.tickets: list[tuple[str, int, Ticket, list[dict[str, Any]]]] = []
        self.held: dict[tuple[str, int], int] = {}  # (kind, token) -> owner
        self.gone: set[Ticket] = set()
        self.last_token = {"lock": 0, "pool": 0}
        self.events: list[tuple[str, Ticket]] = []

    def _free_now(self, kind: str) -> bool:
        self.store.expire_due()
        res = self.store._resources.get((kind, "L" if kind == "lock" else "P"))
        return res is None or (bool(res.free) and not self.store.waiters(res.qname))

    def _grant(self, kind: str, owner: int, result: dict[str, Any]) -> None:
        assert result["ok"] is True
        assert result["token"] > self.last_token[kind]
        self.last_token[kind] = result["token"]
        self.held[(kind, result["token"])] = owner

    @rule(
        kind=st.sampled_from(["lock", "pool"]),
        owner=OWNERS,
        ttl=st.sampled_from([None, 1.0, 5.0]),
        timeout=st.sampled_from([None, 0.0, 2.0]),
    )
    def acquire(self, kind: str, owner: int, ttl: float | None, timeout: float | None) -> None:
        name = "L" if kind == "lock" else "P"
        if timeout == 0 and not self._free_now(kind):
            with pytest.raises(Refused, match="timeout"):
                self.store.acquire(kind, name, Waiter(owner=owner, timeout=timeout), ttl=ttl)
            return
        result = self.store.acquire(kind, name, Waiter(owner=owner, timeout=timeout), ttl=ttl)
        if isinstance(result, dict):
            self._grant(kind, owner, result)
            return
        out: list[dict[str, Any]] = []

        def done(t: Ticket, kind: str = kind, owner: int = owner) -> None:
            assert t.result is not None
            assert t not in self.gone, "a dead ticket was granted"
            out.append(t.result)
            if t.result["ok"]:
                self.events.append(("granted", t))
                self._grant(kind, owner, t.result)

        result.on_done = done
        self.tickets.append((kind, owner, result, out))

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if not self.held:
            return
        kind, token = data.draw(st.sampled_from(sorted(self.held)))
        del self.held[(kind, token)]
        name = "L" if kind == "lock" else "P"
        self.store.unhold(kind, name, token)

    @rule(owner=OWNERS)
    def disconnect(self, owner: int) -> None:
        for _, o, ticket, _ in self.tickets:
            if o == owner and ticket.waiting:
                self.gone.add(ticket)
        self.store.release_owner(owner)
        self.held = {k: o for k, o in self.held.items() if o != owner}

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.store.expire_due()

    @invariant()
    def capacity_and_bookkeeping(self) -> None:
        store = self.store
        # Claims expire by TTL without telling the model: count what the store holds.
        lock = store._resources.get(("lock", "L"))
        assert lock is None or len(lock.holds) <= 1
        pool = store._resources[("pool", "P")]
        assert len(pool.holds) + len(pool.free) == 2
        assert sorted([h.item for h in pool.holds.values()] + list(pool.free)) == [0, 1]
        for held in (lock, pool):
            # Nobody waits while an item is free (a freed item goes to the first waiter).
            if held is not None and held.free:
                assert not store.waiters(held.qname)
        for _, _, ticket, out in self.tickets:
            assert len(out) <= 1, "a ticket was answered twice"
            if ticket in self.gone:
                assert out == []

    @invariant()
    def fifo(self) -> None:
        # Among tickets of one resource, grants happen in the order they queued.
        for kind in ("lock", "pool"):
            queued = [t for k, _, t, _ in self.tickets if k == kind]
            granted = [t for _, t in self.events if t in queued]
            positions = [queued.index(t) for t in granted]
            assert positions == sorted(positions)


CoordinationMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
test_coordination_machine = CoordinationMachine.TestCase


def test_release_owner_is_idempotent_and_fences_keep_growing(store: Store) -> None:
    granted(store.acquire("lock", "L", Waiter(owner=1)))
    assert store.release_owner(1) == 1
    assert store.release_owner(1) == 0
    assert granted(store.acquire("lock", "L", Waiter(owner=2)))["token"] == 2  # not reset


def attempt(fn: Callable[[], Any]) -> tuple[str | None, Any]:
    """``(None, result)``, or ``(code, None)`` when the store refused."""
    try:
        return None, fn()
    except Refused as exc:
        return exc.code, None


class OnceAndQueueMachine(RuleBasedStateMachine):
    """Random interleavings of once() callers that compute, fail, die or time out, and of
    pushes and pops with disconnecting consumers.

    Invariants: at most one caller computes a key at any time; every caller told the
    value got the one stored value; every pushed item is delivered at most once and none
    is lost (delivered + still queued == pushed); dead tickets get nothing.
    """

    OWNERS = st.integers(min_value=1, max_value=5)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = Store(self.clock, require_ttl=False, default_ttl=10_000.0)
        self.computing: set[int] = set()  # owners told to compute "k" and not done yet
        self.values: list[Any] = []
        self.stored: Any = None
        self.failed = False
        self.pushed: list[int] = []
        self.delivered: list[int] = []
        self.gone: set[Ticket] = set()
        self.tickets: list[tuple[int, Ticket]] = []
        self.next_item = 0

    def _once_answer(self, owner: int, answer: dict[str, Any]) -> None:
        if answer.get("status") == "compute":
            self.computing.add(owner)
        elif answer.get("status") == "done":
            self.values.append(answer["value"])
        else:
            assert answer["error"] in ("once_failed", "timeout")

    @rule(owner=OWNERS, timeout=st.sampled_from([None, 1.0]))
    def once(self, owner: int, timeout: float | None) -> None:
        if owner in self.computing:
            return  # a client does not ask again while it computes
        code, result = attempt(
            lambda: self.store.once_begin("k", Waiter(owner=owner, timeout=timeout))
        )
        if code is not None:
            assert code == "once_failed"
            assert self.failed
            return
        if isinstance(result, dict):
            self._once_answer(owner, result)
            return

        def done(t: Ticket, owner: int = owner) -> None:
            assert t not in self.gone, "a dead ticket was answered"
            assert t.result is not None
            self._once_answer(owner, t.result)

        result.on_done = done
        self.tickets.append((owner, result))

    @rule(data=st.data(), fail=st.booleans())
    def finish(self, data: st.DataObject, fail: bool) -> None:
        if not self.computing:
            return
        owner = data.draw(st.sampled_from(sorted(self.computing)))
        self.computing.discard(owner)
        if fail:
            self.store.once_fail("k", "boom", "RuntimeError", ttl=5, owner=owner)
            self.failed = True
        else:
            answer = self.store.once_done("k", owner)
            if answer["status"] == "stored":
                self.stored = owner
                self.failed = False

    @rule(owner=OWNERS)
    def disconnect(self, owner: int) -> None:
        for o, ticket in self.tickets:
            if o == owner and ticket.waiting:
                self.gone.add(ticket)
        self.computing.discard(owner)
        self.store.release_owner(owner)

    @rule(count=st.integers(min_value=1, max_value=3))
    def push(self, count: int) -> None:
        items = list(range(self.next_item, self.next_item + count))
        self.next_item += count
        self.pushed += items
        self.store.push("q", items)

    @rule(owner=OWNERS, timeout=st.sampled_from([None, 0.0, 1.0]))
    def pop(self, owner: int, timeout: float | None) -> None:
        code, result = attempt(lambda: self.store.pop("q", Waiter(owner=owner, timeout=timeout)))
        if code is not None:
            assert code == "timeout"
            return
        if isinstance(result, dict):
            self.delivered.append(result["value"])
            return

        def done(t: Ticket) -> None:
            assert t not in self.gone, "a dead ticket was answered"
            assert t.result is not None
            if t.result["ok"]:
                self.delivered.append(t.result["value"])

        result.on_done = done
        self.tickets.append((owner, result))

    @rule(seconds=st.sampled_from([0.5, 1.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.store.expire_due()

    @invariant()
    def one_computer_and_one_value(self) -> None:
        assert len(self.computing) <= 1
        assert all(value == self.stored for value in self.values)

    @invariant()
    def every_item_once(self) -> None:
        queued = [value for value, _ in self.store._work.get("q", ())]
        assert sorted(self.delivered + queued) == self.pushed


OnceAndQueueMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None
)
test_once_and_queue_machine = OnceAndQueueMachine.TestCase


def test_waiters_that_left_are_pruned(store: Store, clock: FakeClock) -> None:
    for owner in range(50):
        store.pop("q", Waiter(owner=owner, timeout=1))
    live = answers(store.pop("q", Waiter(owner=99)))
    clock.advance(1)
    store.expire_due()
    assert store.prune_waiters() == 50
    assert len(store._queues["pop\0q"]) == 1
    store.push("q", ["x"])
    assert live == [{"ok": True, "value": "x"}]
    assert store.prune_waiters() == 0
    assert store._queues == {}


class BarrierMachine(RuleBasedStateMachine):
    """Arrivals, departures and timeouts at a barrier of 3: each round that passes hands
    out indexes 0, 1, 2 exactly once; once broken, every waiter got the error, nobody
    passes again, and a member that left is never answered."""

    OWNERS = st.integers(min_value=1, max_value=6)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = Store(self.clock, require_ttl=False)
        self.waiting: dict[int, Ticket] = {}
        self.round: list[int] = []  # indexes answered in the current round
        self.rounds: list[list[int]] = []
        self.broken = False
        self.errors = 0
        self.gone: set[Ticket] = set()

    def _passed(self, index: int) -> None:
        assert not self.broken
        self.round.append(index)
        if len(self.round) == 3:
            self.rounds.append(sorted(self.round))
            self.round = []

    @rule(owner=OWNERS, timeout=st.sampled_from([None, 1.0]))
    def arrive(self, owner: int, timeout: float | None) -> None:
        if owner in self.waiting:
            return
        code, result = attempt(
            lambda: self.store.barrier("b", 3, Waiter(owner=owner, timeout=timeout))
        )
        if code is not None:
            assert code == "barrier_broken"
            assert self.broken
            return
        if isinstance(result, dict):
            self._passed(result["index"])
            return

        def done(t: Ticket, owner: int = owner) -> None:
            assert t not in self.gone
            assert t.result is not None
            self.waiting.pop(owner, None)
            if t.result["ok"]:
                self._passed(t.result["index"])
            else:
                if t.result["error"] == "barrier_broken":
                    self.errors += 1
                self.broken = True

        result.on_done = done
        self.waiting[owner] = result

    @rule(owner=OWNERS)
    def leave(self, owner: int) -> None:
        ticket = self.waiting.pop(owner, None)
        if ticket is not None:
            self.gone.add(ticket)
            self.broken = True
        self.store.release_owner(owner, f"member {owner} left")

    @rule()
    def advance(self) -> None:
        self.clock.advance(1.0)
        self.store.expire_due()

    @invariant()
    def rounds_are_whole(self) -> None:
        assert all(r == [0, 1, 2] for r in self.rounds)
        if self.broken:
            assert not self.waiting or all(not t.waiting for t in self.waiting.values())


BarrierMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
test_barrier_machine = BarrierMachine.TestCase
