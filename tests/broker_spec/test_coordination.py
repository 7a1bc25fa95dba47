"""Coordination (issue 5) in one process: add, incr, once, lock, pools, throttle, barrier,
queues and status, against every backend that implements them."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from corral.errors import (
    BarrierBroken,
    BrokerTimeout,
    BrokerUnavailable,
    ClaimLost,
    InvalidRequest,
    KeyNotFound,
    OnceFailed,
    PoolConflict,
)
from tests.broker_spec.conftest import Backend, needs, wait_until, waiting


@needs("add", "get")
def test_add_sets_only_when_absent(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    assert a.add("k", "first", ttl=60) is True
    assert b.add("k", "second", ttl=60) is False
    assert b.get("k") == "first"
    a.set("short", 1, ttl=0.05)
    time.sleep(0.15)
    assert a.add("short", 2, ttl=60) is True  # an expired key counts as absent


@needs("incr", "get")
def test_incr_counts_from_zero(backend: Backend) -> None:
    client = backend.client()
    assert client.incr("n") == 1
    assert client.incr("n", 10) == 11
    assert client.incr("n", -12) == -1
    assert client.get("n") == -1
    client.set("text", "abc", ttl=60)
    with pytest.raises(InvalidRequest):
        client.incr("text")
    with pytest.raises(TypeError):
        client.incr("n", 1.5)


@needs("incr")
def test_incr_ttl(backend: Backend) -> None:
    client = backend.client()
    assert client.incr("n", ttl=0.05) == 1
    time.sleep(0.15)
    assert client.incr("n") == 1


@needs("once", "get")
def test_once_computes_once_and_stores_the_value(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    calls: list[int] = []

    def compute() -> dict[str, Any]:
        calls.append(1)
        return {"dsn": "postgresql:///template"}

    assert a.once("setup", compute, ttl=60) == {"dsn": "postgresql:///template"}
    assert b.once("setup", compute, ttl=60) == {"dsn": "postgresql:///template"}
    assert a.get("setup") == {"dsn": "postgresql:///template"}
    assert calls == [1]


@needs("once")
def test_once_failure_reaches_every_caller_with_its_message(backend: Backend) -> None:
    a, b = backend.client(), backend.client()

    def explode() -> None:
        raise RuntimeError("migration 0042 failed")

    with pytest.raises(RuntimeError, match="migration 0042 failed"):
        a.once("setup", explode, ttl=60)  # the computing caller gets its own exception
    with pytest.raises(OnceFailed) as failed:
        b.once("setup", lambda: "never called", ttl=60)
    assert failed.value.message == "migration 0042 failed"
    assert failed.value.error_type == "RuntimeError"
    assert "migration 0042 failed" in str(failed.value)


@needs("once")
def test_once_waiters_share_the_value_and_time_out(backend: Backend) -> None:
    computer, waiter, impatient = backend.client(), backend.client(), backend.client()
    started, finish = threading.Event(), threading.Event()
    results: list[Any] = []

    def slow() -> int:
        started.set()
        finish.wait(10)
        return 7

    thread = threading.Thread(target=lambda: results.append(computer.once("v", slow, ttl=60)))
    thread.start()
    assert started.wait(10)
    with pytest.raises(BrokerTimeout):
        impatient.once("v", lambda: 0, timeout=0.1)
    other = threading.Thread(target=lambda: results.append(waiter.once("v", lambda: 0, ttl=60)))
    other.start()
    wait_until(lambda: waiting(waiter, "once", "v") == 1, 5, "the waiter to queue")
    finish.set()
    thread.join(10)
    other.join(10)
    assert results == [7, 7]


@needs("once")
def test_once_non_json_result_fails_cleanly(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    with pytest.raises(TypeError):
        a.once("bad", lambda: {1, 2}, ttl=60)
    with pytest.raises(OnceFailed, match="TypeError"):
        b.once("bad", lambda: 1, ttl=60)


@needs("lock")
def test_lock_tokens_increase_and_exclude(backend: Backend) -> None:
    clients = [backend.client() for _ in range(4)]
    inside: list[int] = []
    tokens: list[int] = []
    overlap: list[bool] = []

    def work(client: Any) -> None:
        for _ in range(5):
            with client.lock("critical", timeout=30) as token:
                inside.append(1)
                overlap.append(len(inside) > 1)
                tokens.append(token)
                time.sleep(0.002)
                inside.pop()

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(overlap)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 20


@needs("lock", "status")
def test_lock_is_fair_and_a_timed_out_waiter_is_never_granted(backend: Backend) -> None:
    holder = backend.client()
    observer = backend.client()
    order: list[str] = []
    threads = []
    with holder.lock("fifo") as first:
        with pytest.raises(BrokerTimeout), observer.lock("fifo", timeout=0.1):
            pass
        with pytest.raises(BrokerTimeout), observer.lock("fifo", timeout=0):
            pass
        for n, name in enumerate(["b", "c", "d"]):
            client = backend.client()

            def wait(client: Any = client, name: str = name) -> None:
                with client.lock("fifo", timeout=30) as token:
                    order.append(name)
                    assert token > first

            thread = threading.Thread(target=wait)
            thread.start()
            threads.append(thread)
            queued = n + 1
            wait_until(lambda: waiting(observer, "lock", "fifo") == queued, 5, "queueing")  # noqa: B023
    for thread in threads:
        thread.join(30)
    assert order == ["b", "c", "d"]
    assert not [h for h in observer.status()["holders"] if h["kind"] == "lock"]


@needs("lock")
def test_lock_ttl_frees_a_hung_holder_and_the_holder_learns_it(backend: Backend) -> None:
    holder, other = backend.client(), backend.client()
    held = holder.lock("hung", ttl=0.2)
    held.__enter__()
    with other.lock("hung", timeout=10):
        pass  # got in once the holder's TTL passed
    with pytest.raises(ClaimLost):
        held.__exit__(None, None, None)


@needs("lock")
def test_lock_released_when_the_body_raises(backend: Backend) -> None:
    client = backend.client()
    with pytest.raises(ZeroDivisionError), client.lock("l"):
        raise ZeroDivisionError
    with client.lock("l", timeout=0):
        pass


@needs("pool", "acquire")
def test_pool_declaration_is_idempotent_and_checked(backend: Backend) -> None:
    client = backend.client()
    assert client.pool("dbs", ["db-1", "db-2"]) is True
    assert client.pool("dbs", ["db-1", "db-2"]) is False
    with pytest.raises(PoolConflict):
        client.pool("dbs", ["db-1"])
    with pytest.raises(KeyNotFound), client.acquire("undeclared", timeout=0):
        pass
    with pytest.raises(ValueError):
        client.pool("empty", [])


@needs("pool", "acquire")
def test_acquire_blocks_until_an_item_is_free(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    a.pool("dbs", [{"name": "db-1"}, {"name": "db-2"}])
    got: list[Any] = []
    with a.acquire("dbs") as first, a.acquire("dbs") as second:
        assert {first["name"], second["name"]} == {"db-1", "db-2"}
        with pytest.raises(BrokerTimeout), b.acquire("dbs", timeout=0.1):
            pass

        def take() -> None:
            with b.acquire("dbs", timeout=30) as item:
                got.append(item)

        thread = threading.Thread(target=take)
        thread.start()
        time.sleep(0.05)
        assert got == []
    thread.join(10)
    assert len(got) == 1
    assert got[0]["name"] in {"db-1", "db-2"}


@needs("throttle")
def test_throttle_spaces_calls_run_wide(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    started = time.monotonic()
    for client in (a, b, a, b, a):
        client.throttle("api", 2, per=0.2)
    # Five calls at 2 per 0.2 s: slots at 0, 0, 0.2, 0.2, 0.4.
    assert time.monotonic() - started >= 0.39
    a.throttle("slow", 1, per=60)
    started = time.monotonic()
    with pytest.raises(BrokerTimeout):
        a.throttle("slow", 1, per=60, timeout=0.5)
    assert time.monotonic() - started < 0.5  # known at once: the next slot is a minute away


@needs("barrier")
def test_barrier_releases_all_parties_and_is_reusable(backend: Backend) -> None:
    clients = [backend.client() for _ in range(3)]
    for _round in range(2):
        indexes: list[int] = []
        threads = [
            threading.Thread(
                target=lambda c=c, out=indexes: out.append(c.barrier("b", 3, timeout=30))
            )
            for c in clients
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(indexes) == [0, 1, 2]


@needs("barrier")
def test_barrier_timeout_breaks_it_for_everyone(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    errors: list[BaseException] = []

    def member() -> None:
        try:
            b.barrier("b", 3, timeout=30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=member)
    thread.start()
    with pytest.raises(BrokerTimeout):
        a.barrier("b", 3, timeout=0.3)
    thread.join(10)
    assert len(errors) == 1
    assert isinstance(errors[0], BarrierBroken)
    with pytest.raises(BarrierBroken):
        a.barrier("b", 3, timeout=1)
    assert a.barrier("solo", 1) == 0
    with pytest.raises(InvalidRequest):
        a.barrier("solo", 2, timeout=0.1)  # declared with another number of parties


@needs("push", "pop")
def test_queue_is_fifo_and_pop_waits(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    assert a.push("work", 1, "two", {"three": 3}) == 3
    assert [b.pop("work"), b.pop("work"), b.pop("work")] == [1, "two", {"three": 3}]
    with pytest.raises(BrokerTimeout):
        b.pop("work", timeout=0.1)
    with pytest.raises(BrokerTimeout):
        b.pop("work", timeout=0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(b.pop("work", timeout=10)))
    thread.start()
    time.sleep(0.05)
    a.push("work", "late")
    thread.join(10)
    assert got == ["late"]
    with pytest.raises(TypeError):
        a.push("work", {1})


@needs("status", "lock", "lease")
def test_status_shows_holders_and_waiters(backend: Backend) -> None:
    holder, waiter, observer = backend.client(), backend.client(), backend.client()
    holder.lease("slots", "gw0", ttl=60)
    with holder.lock("migrations", ttl=30):

        def wait() -> None:
            with waiter.lock("migrations", timeout=30):
                pass

        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: waiting(observer, "lock", "migrations") == 1, 5, "the waiter")
        status = observer.status()
        held = {(h["kind"], h["name"]) for h in status["holders"]}
        assert {("lock", "migrations"), ("lease", "slots")} <= held
        lock = next(h for h in status["holders"] if h["kind"] == "lock")
        assert 0 < lock["ttl_left"] <= 30
        assert lock["since"] <= time.time() + 1
        waiter_entry = next(w for w in status["waiters"] if w["name"] == "migrations")
        assert "pid" in waiter_entry["who"]
    thread.join(10)
    status = observer.status()
    assert [h["kind"] for h in status["holders"]] == ["lease"]
    assert status["waiters"] == []


@needs("lock", "status")
def test_close_ends_a_wait_in_progress_and_leaves_nothing(backend: Backend) -> None:
    holder, waiter = backend.client(), backend.client()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            with waiter.lock("l", timeout=30):
                pass
        except BaseException as exc:
            errors.append(exc)

    with holder.lock("l"):
        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: waiting(holder, "lock", "l") == 1, 5, "the waiter to queue")
        waiter.close()
        thread.join(10)
        assert not thread.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], BrokerUnavailable)
        wait_until(lambda: waiting(holder, "lock", "l") == 0, 5, "the ticket to go")
    with holder.lock("l", timeout=0):
        pass
    time.sleep(0.2)  # nothing came back to life behind the closed client's back
    assert [h for h in holder.status()["holders"] if h["kind"] == "lock"] == []
