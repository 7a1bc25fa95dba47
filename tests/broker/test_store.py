"""The pure store with a fake clock: TTLs, limits, leases, owners, tickets, one deadline heap."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from corral.broker._store import Refused, Store, Ticket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Store:
    return Store(clock, require_ttl=False, default_ttl=60.0, max_items=3, max_value_size=50)


def refused(code: str) -> pytest.RaisesExc[Refused]:
    return pytest.raises(Refused, match=code)


def test_set_get_delete(store: Store) -> None:
    store.set("a", {"x": 1}, ttl=10)
    assert store.get("a").value == {"x": 1}
    assert store.delete("a") is True
    assert store.delete("a") is False
    with refused("not_found"):
        store.get("a")


def test_expiry_is_reported_once_then_not_found(store: Store, clock: FakeClock) -> None:
    store.set("a", 1, ttl=10)
    clock.advance(9.999)
    assert store.get("a").value == 1
    clock.advance(0.001)
    with refused("expired"):
        store.get("a")
    with refused("not_found"):
        store.get("a")


def test_get_does_not_slide_the_expiry(store: Store, clock: FakeClock) -> None:
    store.set("a", 1, ttl=10)
    for _ in range(9):
        clock.advance(1)
        store.get("a")
    clock.advance(1)
    with refused("expired"):
        store.get("a")


def test_default_ttl_and_ttl_rules(clock: FakeClock) -> None:
    optional = Store(clock, require_ttl=False, default_ttl=60.0)
    optional.set("a", 1)
    optional.set("zero", 1, ttl=0)  # Node: a falsy ttl means the default
    clock.advance(59)
    assert optional.get("a").value == 1
    assert optional.get("zero").value == 1
    clock.advance(1)
    with refused("expired"):
        optional.get("a")
    required = Store(clock, require_ttl=True)
    with refused("ttl_required"):
        required.set("a", 1)
    with refused("invalid_ttl"):
        required.set("a", 1, ttl=0)
    for bad in (-1.0, float("inf"), float("nan")):
        with refused("invalid_ttl"):
            optional.set("a", 1, ttl=bad)


def test_value_size_limit(store: Store) -> None:
    store.set("ok", "x" * 50)
    with refused("too_large"):
        store.set("big", "x" * 51)
    with refused("too_large"):
        store.set("big", ["x" * 20, "y" * 30])
    # A size hint at or below the limit is trusted; above it the value is measured.
    store.set("hinted", "x" * 10, size=10_000)


def test_max_items_counts_keys_and_allows_updates(store: Store, clock: FakeClock) -> None:
    for key in "abc":
        store.set(key, 1, ttl=10)
    with refused("max_items"):
        store.set("d", 1)
    store.set("a", 2)  # updating an existing key is always allowed
    store.delete("b")
    store.set("d", 1, ttl=10)
    clock.advance(10)
    store.set("e", 1)  # expired keys do not count against the limit
    assert store.item_count <= 3


def test_listing_reports_epoch_ms(clock: FakeClock) -> None:
    store = Store(clock, wall=lambda: 1_700_000_000.0 + clock.now, require_ttl=False)
    store.set("a", None, ttl=2.5)
    assert store.listing() == {
        "a": {"expires": round((1_700_000_000.0 + clock.now + 2.5) * 1000), "hasValue": False}
    }


def test_one_deadline_heap_wakes_at_the_next_deadline(store: Store, clock: FakeClock) -> None:
    assert store.next_deadline() is None
    store.set("late", 1, ttl=30)
    store.set("soon", 1, ttl=5)
    assert store.next_deadline() == clock.now + 5
    clock.advance(5)
    assert store.expire_due() == 1
    assert store.item_count == 1
    assert store.expired_items == 1


def test_overwrites_leave_no_live_garbage(store: Store, clock: FakeClock) -> None:
    big = Store(clock, require_ttl=False, max_items=0)
    for i in range(5000):
        big.set("same", i, ttl=10 + i)
    big.compact()
    assert len(big._heap) == 1
    assert big.approx_bytes > 0
    big.delete("same")
    assert big.approx_bytes == 0


def test_leases_follow_node_semantics(store: Store, clock: FakeClock) -> None:
    assert store.lease("db", "w1", None) == 0
    assert store.lease("db", "w2", None) == 1
    assert store.lease("db", "w1", None) == 0  # renewal keeps the value
    with refused("worker_already_has_lease"):
        store.lease("other", "w1", None)
    assert store.release("w1") is True
    assert store.release("w1") is False
    assert store.lease("db", "w3", None) == 0  # smallest free number
    assert store.lease("other", "w1", None) == 0


def test_lease_expires_and_frees_its_number(store: Store, clock: FakeClock) -> None:
    store.lease("db", "w1", 5)
    store.lease("db", "w2", 50)
    clock.advance(5)
    assert store.lease("db", "w3", 5) == 0
    assert store.expired_leases == 1
    clock.advance(5)
    store.expire_due()
    assert store.lease_count == 1


def test_release_owner_frees_leases_of_that_connection_only(store: Store) -> None:
    store.lease("db", "w1", None, owner=1)
    store.lease("db", "w2", None, owner=2)
    store.lease("db", "w3", None)  # one-shot connection: TTL-only
    assert store.release_owner(1) == 1
    assert store.lease("db", "w4", None) == 0
    assert store.release_owner(1) == 0
    assert store.lease_count == 3


def test_tickets_are_fifo_and_dead_ones_are_never_granted(store: Store, clock: FakeClock) -> None:
    answers: list[tuple[str, object]] = []

    def ticket(owner: int, timeout: float | None = None) -> Ticket:
        t = Ticket("pool", owner, clock.now)
        t.on_done = lambda t: answers.append((t.state, t.result))
        store.enqueue(t, timeout)
        return t

    first, gone, timed, last = ticket(1), ticket(2), ticket(3, timeout=1.0), ticket(4)
    assert store.release_owner(2) == 1  # its connection closed
    clock.advance(1)
    store.expire_due()
    assert timed.state == Ticket.FAILED
    assert answers == [
        ("failed", {"ok": False, "error": "timeout", "detail": "gave up waiting for wait 'pool'"})
    ]
    assert store.next_waiter("pool") is first
    assert first.set({"ok": True}) is True
    assert first.set({"ok": True}) is False  # decided once
    assert store.next_waiter("pool") is last
    assert store.next_waiter("pool") is None
    assert not gone.set({"ok": True})
    assert store.holdings(4) == 0


def test_clear_fails_waiting_tickets(store: Store, clock: FakeClock) -> None:
    t = Ticket("x", 1, clock.now)
    store.enqueue(t)
    store.set("a", 1)
    store.clear()
    assert t.state == Ticket.FAILED
    assert store.item_count == 0
    assert store.next_deadline() is None


def attempt(action: Callable[[], object]) -> str | None:
    """Run *action*; the refusal code, or None when it succeeded."""
    try:
        action()
    except Refused as exc:
        return exc.code
    return None


class StoreModel(RuleBasedStateMachine):
    """The store against a dict model, under a fake clock that jumps around deadlines."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = Store(self.clock, require_ttl=False, default_ttl=10.0, max_items=5)
        self.model: dict[str, tuple[object, float]] = {}  # key -> (value, deadline)
        self.leases: dict[str, tuple[str, int, float]] = {}  # worker -> (key, value, deadline)

    def live(self) -> dict[str, object]:
        return {k: v for k, (v, d) in self.model.items() if d > self.clock.now}

    keys = st.sampled_from(["a", "b", "c", "d", "e", "f", "g"])

    @rule(key=keys, value=st.integers(), ttl=st.none() | st.floats(0.5, 20))
    def set(self, key: str, value: int, ttl: float | None) -> None:
        live = self.live()
        full = key not in live and len(live) >= 5
        code = attempt(lambda: self.store.set(key, value, ttl=ttl))
        assert code == ("max_items" if full else None)
        if full:
            return
        self.model[key] = (value, self.clock.now + (ttl or 10.0))

    @rule(key=keys)
    def get(self, key: str) -> None:
        got: list[object] = []
        code = attempt(lambda: got.append(self.store.get(key).value))
        if code is not None:
            assert key not in self.live()
            assert code in ("not_found", "expired")
        else:
            assert self.live()[key] == got[0]

    @rule(key=keys)
    def delete(self, key: str) -> None:
        assert self.store.delete(key) == (key in self.live())
        self.model.pop(key, None)

    @rule(seconds=st.floats(0, 8))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def expire(self) -> None:
        self.store.expire_due()

    @rule()
    def compact(self) -> None:
        self.store.compact()

    workers = st.sampled_from(["w1", "w2", "w3"])

    @rule(key=st.sampled_from(["p", "q"]), worker=workers, ttl=st.none() | st.floats(0.5, 20))
    def lease(self, key: str, worker: str, ttl: float | None) -> None:
        now = self.clock.now
        mine = self.leases.get(worker)
        if mine is not None and mine[2] <= now:
            mine = None
        values: list[int] = []
        code = attempt(lambda: values.append(self.store.lease(key, worker, ttl)))
        if code is not None:
            assert code == "worker_already_has_lease"
            assert mine is not None
            assert mine[0] != key
            return
        value = values[0]
        taken = {v for w, (k, v, d) in self.leases.items() if k == key and d > now and w != worker}
        if mine is not None:
            assert value == mine[1]
        else:
            assert value == min(set(range(4)) - taken)
        self.leases[worker] = (key, value, now + (ttl or 10.0))

    @precondition(lambda self: bool(self.leases))
    @rule(worker=workers)
    def release(self, worker: str) -> None:
        held = self.leases.pop(worker, None)
        assert self.store.release(worker) == (held is not None and held[2] > self.clock.now)

    @invariant()
    def keys_match(self) -> None:
        assert set(self.store.keys()) == set(self.live())

    @invariant()
    def heap_holds_every_live_deadline(self) -> None:
        deadline = self.store.next_deadline()
        pending = [d for _, d in self.model.values()] + [d for *_, d in self.leases.values()]
        if any(d > self.clock.now for d in pending):
            assert deadline is not None


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_keys_expired_by_the_timer_still_say_expired(clock: FakeClock) -> None:
    store = Store(clock, require_ttl=False, tombstone_ttl=30)
    store.set("a", 1, ttl=1)
    store.set("b", 1, ttl=1)
    clock.advance(1)
    assert store.expire_due() == 2
    assert store.item_count == 0
    with refused("expired"):
        store.get("a")
    with refused("not_found"):
        store.get("a")  # reported once, as Node does
    clock.advance(31)
    store.compact()
    with refused("not_found"):
        store.get("b")  # the tombstone is bounded by the sweep
