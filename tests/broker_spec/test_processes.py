"""Real processes racing, crashing and being ``kill -9``ed, on every backend that has the
operations. Workers are ``tests/broker_spec/_worker.py`` connected with a bare ``Client()``."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.broker_spec.conftest import SESSION_TTL, Backend, needs, wait_until, waiting

pytestmark = pytest.mark.slow

#: A killed holder's claims must be free within its session TTL plus a heartbeat or two
#: (Redis; the socket broker frees them at once). Generous for a loaded 2-core machine.
FREED_WITHIN = SESSION_TTL * 2 + 3.0


def line(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    """The next JSON line a worker prints."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    text = proc.stdout.readline()
    if not text:
        proc.wait(max(0.1, deadline - time.monotonic()))
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        pytest.fail(f"worker exited ({proc.returncode}) without output: {stderr[-3000:]}")
    return dict(json.loads(text))


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    result = line(proc)
    assert proc.wait(60) == 0
    return result


@needs("once", "incr", "get")
def test_eight_processes_race_once_and_compute_runs_once(backend: Backend) -> None:
    procs = [backend.spawn("once", "setup", "ok") for _ in range(8)]
    results = [finish(p) for p in procs]
    assert results == [{"value": {"template": "db-1"}}] * 8
    assert backend.client().get("computed") == 1


@needs("once", "incr", "get")
def test_a_raising_compute_fails_all_eight_with_its_message(backend: Backend) -> None:
    procs = [backend.spawn("once", "setup", "raise") for _ in range(8)]
    results = [finish(p) for p in procs]
    assert results.count({"raised": "setup exploded"}) == 1
    assert results.count({"failed": "setup exploded", "type": "RuntimeError"}) == 7
    assert backend.client().get("computed") == 1  # one failure, not eight retries


@needs("once", "incr", "get", "status")
def test_a_killed_computer_is_replaced_by_a_waiter(backend: Backend) -> None:
    observer = backend.client()
    computer = backend.spawn("once", "setup", "hang")
    assert line(computer) == {"computing": True}
    waiters = [backend.spawn("once", "setup", "ok") for _ in range(2)]
    wait_until(lambda: waiting(observer, "once", "setup") == 2, 30, "two waiters")
    computer.kill()
    killed = time.monotonic()
    results = [finish(p) for p in waiters]
    assert time.monotonic() - killed < FREED_WITHIN + 1  # + the 0.2 s compute
    assert results == [{"value": {"template": "db-1"}}] * 2
    assert observer.get("computed") == 2  # the dead one's attempt, then exactly one more


@needs("incr", "get")
def test_eight_processes_times_1000_incr_sum_exactly(backend: Backend) -> None:
    procs = [backend.spawn("incr", 1000) for _ in range(8)]
    for proc in procs:
        assert finish(proc) == {"done": True}
    assert backend.client().get("total") == 8000


@needs("pool", "acquire", "incr", "get")
def test_a_pool_of_two_never_has_three_holders(backend: Backend) -> None:
    procs = [backend.spawn("pool", "dbs", 15) for _ in range(5)]
    for proc in procs:
        assert finish(proc) == {"done": True}
    client = backend.client()
    assert client.get("violations", 0) == 0  # checked from inside the holders
    assert client.get("inside") == 0
    assert client.get("used-db-a") + client.get("used-db-b") == 75


@needs("lock", "status")
def test_kill_9_of_a_lock_holder_lets_the_waiter_in(backend: Backend) -> None:
    observer = backend.client()
    holder = backend.spawn("hold_lock", "shared")
    held = line(holder)
    waiter = backend.spawn("wait_lock", "shared")
    wait_until(lambda: waiting(observer, "lock", "shared") == 1, 30, "the waiter to queue")
    holder.kill()
    killed = time.time()
    got = finish(waiter)
    assert got["at"] - killed < FREED_WITHIN
    assert got["token"] > held["token"]  # fencing: the new holder's token is larger


@needs("barrier", "status")
def test_a_barrier_with_a_dead_member_errors_instead_of_hanging(backend: Backend) -> None:
    observer = backend.client()
    survivor = backend.spawn("barrier", "start", 3)
    doomed = backend.spawn("barrier", "start", 3)
    wait_until(lambda: waiting(observer, "barrier", "start") == 2, 30, "two members")
    doomed.kill()
    killed = time.time()
    result = finish(survivor)
    assert "broken" in result
    assert str(doomed.pid) in result["broken"]  # the reason names the dead member
    assert result["at"] - killed < FREED_WITHIN


@needs("barrier")
def test_three_processes_pass_a_barrier(backend: Backend) -> None:
    procs = [backend.spawn("barrier", "go", 3) for _ in range(3)]
    results = [finish(p) for p in procs]
    assert sorted(r["index"] for r in results) == [0, 1, 2]


@needs("push", "pop")
def test_four_consumers_pop_every_item_exactly_once(backend: Backend) -> None:
    producer = backend.client()
    consumers = [backend.spawn("consume", "work") for _ in range(4)]
    items = [{"n": n} for n in range(400)]
    for start in range(0, 400, 50):
        producer.push("work", *items[start : start + 50])
    producer.push("work", *["STOP"] * 4)
    popped = [item for proc in consumers for item in finish(proc)["items"]]
    assert sorted(popped, key=lambda item: item["n"]) == items


@needs("lease", "release")
def test_kill_9_of_a_lease_holder_frees_its_number(backend: Backend) -> None:
    observer = backend.client()
    holder = backend.spawn("hold_lease", "slots")
    assert line(holder) == {"number": 0}
    assert observer.lease("slots", "observer", ttl=60) == 1
    observer.release("observer")
    holder.kill()

    def zero_is_free() -> bool:
        if observer.lease("slots", "observer", ttl=60) == 0:
            return True
        observer.release("observer")
        return False

    wait_until(zero_is_free, FREED_WITHIN, "the killed holder's lease to be freed")


@needs("push", "pop")
def test_a_killed_waiting_consumer_takes_nothing_with_it(backend: Backend) -> None:
    producer = backend.client()
    consumer = backend.spawn("consume_one", "jobs")
    assert line(consumer) == {"waiting": True}
    time.sleep(0.2)  # it is blocked in pop now
    consumer.kill()
    consumer.wait()
    producer.push("jobs", "job-1")
    assert backend.client().pop("jobs", timeout=5) == "job-1"
