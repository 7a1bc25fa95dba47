"""push/pop on Redis is a reliable queue: no item is lost to a cancelled, interrupted or
killed popper, and none is delivered twice while poppers live."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from corral.broker.redis import AsyncRedisClient, RedisClient
from corral.errors import BrokerTimeout
from tests.broker_spec.conftest import ROOT, wait_until

T = TypeVar("T")
SESSION_TTL = 1.5


def drain(client: RedisClient, queue: str) -> list[Any]:
    items = []
    while True:
        try:
            items.append(client.pop(queue, timeout=0))
        except BrokerTimeout:
            return items


def in_flight_lists(client: RedisClient) -> list[str]:
    return sorted(str(key) for key in client._r.keys(client.prefix + "qi:*"))


def in_flight_items(client: RedisClient) -> list[str]:
    """What pops hold in flight (an interrupted pop keeps an empty list until its
    session ends: a late BLMOVE into it would then still be requeued)."""
    lists = [client._r.lrange(key, 0, -1) for key in in_flight_lists(client)]
    return [str(item) for items in lists for item in items if item != ""]


# ---------------------------------------------------------------------- asyncio cancellation


@pytest.mark.asyncio
async def test_cancelled_pops_never_lose_or_duplicate_an_item(redis_url: str, run: str) -> None:
    # Each round cancels one pop at a different point: before it reaches Redis, while it
    # blocks, right after the item was pushed (its reply on the way), during the ack.
    rng = random.Random(20261121)
    pushed: list[int] = []
    delivered: list[int] = []
    cancelled = 0
    async with AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as producer:
        consumer = AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL)
        try:
            for n in range(300):
                popping = asyncio.ensure_future(consumer.pop("q", timeout=10))
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)
                await producer.push("q", n)
                pushed.append(n)
                for _ in range(rng.randrange(8)):
                    await asyncio.sleep(0)
                popping.cancel()
                try:
                    delivered.append(await popping)
                except asyncio.CancelledError:
                    cancelled += 1
            # asyncio timeouts are cancellations too: tiny ones hit every step of a pop.
            for n in range(300, 450):
                await producer.push("q", n)
                pushed.append(n)
                try:
                    delivered.append(await asyncio.wait_for(consumer.pop("q"), rng.random() / 500))
                except TimeoutError:
                    cancelled += 1
        finally:
            await consumer.aclose()  # ends the session: anything still in flight goes back
        with RedisClient(redis_url, run_id=run) as reader:
            left = drain(reader, "q")
            assert in_flight_lists(reader) == []
    assert len(delivered) == len(set(delivered)), "an item was delivered twice"
    assert sorted(delivered + left) == pushed, "an item was lost"
    assert delivered, "no pop finished: the test proves nothing"
    assert cancelled, "no pop was cancelled: the test proves nothing"


@pytest.mark.asyncio
async def test_a_cancelled_pop_leaves_its_item_at_the_head(redis_url: str, run: str) -> None:
    async with (
        AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as producer,
        AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as consumer,
    ):
        await producer.push("q", "first", "second")
        for _ in range(50):
            popping = asyncio.ensure_future(consumer.pop("q"))
            await asyncio.sleep(0)
            popping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await popping
        assert [await consumer.pop("q", timeout=0) for _ in range(2)] == ["first", "second"]


# ---------------------------------------------------------------------- blocking client


class Interrupted(RedisClient):
    """A real client whose *n*-th Redis call (in the arming thread) is followed by a
    Ctrl-C, as if it arrived just as that answer came back. Fault injection only: Redis
    and redis-py are real."""

    _after: int | None = None
    _thread: int | None = None

    def arm(self, after: int | None) -> None:
        self._after, self._thread = after, threading.get_ident()

    def _call(self, fn: Callable[[], T]) -> T:
        result = super()._call(fn)
        if self._after is not None and threading.get_ident() == self._thread:
            self._after -= 1
            if self._after < 0:
                self._after = None
                raise KeyboardInterrupt
        return result


def blocked_in_blmove(client: RedisClient) -> bool:
    """Whether a connection is blocked in BLMOVE now. ``cmd`` is a connection's last
    command, so an idle one whose last BLMOVE returned shows it too: only those flagged
    ``b`` (blocked) count."""
    listing = client._r.execute_command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("cmd") == "blmove" and "b" in fields.get("flags", ""):
            return True
    return False


@pytest.mark.parametrize("waits", [False, True], ids=["item-ready", "item-waited-for"])
def test_a_ctrl_c_after_any_step_of_a_pop_loses_nothing(
    redis_url: str, run: str, waits: bool
) -> None:
    # Ready: the pop script, then the ack. Waited for: the pop script, BLMOVE, the ack.
    steps = 3 if waits else 2
    popper = Interrupted(redis_url, run_id=run, session_ttl=SESSION_TTL)
    with RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as other:
        popper._session.current()  # registering the session is not a step of the pop
        for step in range(steps + 1):
            item = {"step": step}
            got: list[Any] = []
            done = threading.Event()
            pusher = threading.Thread(target=push_blocked, args=(other, [item, "next"], done))
            if waits:
                pusher.start()
            else:
                other.push("q", item, "next")
            popper.arm(step)
            try:
                got.append(popper.pop("q", timeout=10))
            except KeyboardInterrupt:
                assert step < steps
            else:
                assert step == steps
            finally:
                popper.arm(None)
                done.set()
                if waits:
                    pusher.join(10)
            assert got + drain(other, "q") == [item, "next"], f"Ctrl-C after call {step}"
            assert in_flight_items(other) == []
        popper.close()
        assert in_flight_lists(other) == []  # closing cleared what interrupted pops kept


def push_blocked(client: RedisClient, items: list[Any], done: threading.Event) -> None:
    """Push *items* once the pop blocks in BLMOVE (or has already ended)."""
    wait_until(lambda: done.is_set() or blocked_in_blmove(client), 10, "the pop to block")
    client.push("q", *items)


def test_an_interrupted_pop_s_record_is_forgotten_by_the_reaper(redis_url: str, run: str) -> None:
    # Kept a while for a BLMOVE that Redis might still run late, then dropped by the
    # heartbeat's reaping: a long-lived client interrupted often does not grow.
    popper = Interrupted(redis_url, run_id=run, session_ttl=SESSION_TTL)
    try:
        sid = popper._session.current()
        popper.arm(0)  # Ctrl-C right after the pop script answered "wait"
        with pytest.raises(KeyboardInterrupt):
            popper.pop("q", timeout=10)
        popper.arm(None)
        records = popper._r.zrange(popper.prefix + "qz", 0, -1)
        assert len(records) == 1
        assert len(popper._r.smembers(popper.prefix + "h:" + sid)) == 1
        assert len(in_flight_lists(popper)) == 1
        popper._r.zadd(popper.prefix + "qz", {str(records[0]): 0})  # its time is up

        def forgotten() -> bool:
            members = popper._r.smembers(popper.prefix + "h:" + sid)
            return not members and not in_flight_lists(popper)

        wait_until(forgotten, 10, "the heartbeat to forget the interrupted pop")
        assert popper._r.zcard(popper.prefix + "qz") == 0
    finally:
        popper.close()


def test_timed_out_pops_leave_nothing_in_flight(redis_url: str, run: str) -> None:
    with RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as client:
        for timeout in (0, 0.001, 0.02):
            with pytest.raises(BrokerTimeout):
                client.pop("q", timeout=timeout)
        assert in_flight_lists(client) == []
        assert client._r.smembers(client.prefix + "h:" + str(client._session.sid)) == set()
        client.push("q", 1)
        assert client.pop("q", timeout=0) == 1


# ---------------------------------------------------------------------- kill -9

_POPPER = """
import sys, time
from corral.broker.redis import _flows as flows
from corral.broker.redis import RedisClient

client = RedisClient(sys.argv[1], run_id=sys.argv[2], session_ttl=float(sys.argv[3]))

def take(sid):
    # The first step of a pop only: the item is in flight, never acknowledged.
    return (yield flows.Script("pop", [sid, client._tid(sid), "jobs", 0]))

print(client._owned(take), flush=True)
time.sleep(600)
"""


def test_a_killed_popper_s_item_comes_back_when_its_session_expires(
    redis_url: str, run: str
) -> None:
    with RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as observer:
        observer.push("jobs", "job-1", "job-2")
        child = subprocess.Popen(
            [sys.executable, "-c", _POPPER, redis_url, run, str(SESSION_TTL)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "['ok', '\"job-1\"']"
            assert observer.pop("jobs", timeout=0) == "job-2"  # job-1 is in flight
            with pytest.raises(BrokerTimeout):
                observer.pop("jobs", timeout=0)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            # The observer's heartbeat reaps the dead session, which requeues job-1 and
            # wakes this blocked pop.
            assert observer.pop("jobs", timeout=30) == "job-1"
            with pytest.raises(BrokerTimeout):
                observer.pop("jobs", timeout=0)
            assert in_flight_lists(observer) == []
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def test_closing_a_popper_requeues_what_it_had_in_flight(redis_url: str, run: str) -> None:
    popper = RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL)
    with RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as other:
        other.push("jobs", "job-1")
        sid = popper._session.current()
        reply = popper._run(_first_step(sid, popper._tid(sid)))
        assert reply == ["ok", '"job-1"']
        with pytest.raises(BrokerTimeout):
            other.pop("jobs", timeout=0)
        popper.close()
        assert other.pop("jobs", timeout=0) == "job-1"


def _first_step(sid: str, tid: str) -> Any:
    from corral.broker.redis import _flows as flows

    return (yield flows.Script("pop", [sid, tid, "jobs", 0]))
