"""Coordination on the socket broker beyond the shared spec (tests/broker_spec): ownership
per connection, one-shot (Node-style) TTL-only semantics, waits that never block other
threads or tasks, cancellation, kill -9 handoff time, the wire answers, `corral status`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corral.broker import AsyncClient, Broker, Client
from corral.errors import (
    BrokerTimeout,
    BrokerUnavailable,
    ClaimLost,
    InvalidRequest,
    OnceFailed,
    WaitTimeout,
)
from tests.broker._raw import Raw
from tests.broker.test_cli import corral

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import json, sys, time
from corral import Client
with Client() as c:
    with c.lock("shared") as token:
        print(json.dumps({"token": token}), flush=True)
        time.sleep(3600)
"""

WAITER = """
import json, sys, time
from corral import Client
with Client() as c:
    c.ping()
    print(json.dumps({"ready": True}), flush=True)
    with c.lock("shared", timeout=30) as token:
        print(json.dumps({"token": token, "at": time.monotonic()}), flush=True)
"""


def _spawn(code: str, path: str) -> subprocess.Popen[str]:
    env = {**os.environ, "EPHEMERAL_PIPE": path, "PYTEST_XDIST_WORKER": "gw7"}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, f"worker exited with {proc.wait(10)}"
    return dict(json.loads(text))


def _waiters(client: Client, name: str) -> int:
    return sum(1 for w in client.status()["waiters"] if w["name"] == name)


def _poll(condition: Any, timeout: float = 10.0, why: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {why() if why else ''}"
        time.sleep(0.005)


def test_kill_9_of_a_lock_holder_hands_over_within_a_fraction_of_a_second(
    broker: Broker, client: Client
) -> None:
    procs = [_spawn(HOLDER, broker.path)]
    try:
        holder = procs[0]
        held = _line(holder)
        waiter = _spawn(WAITER, broker.path)  # only now: it must queue behind the holder
        procs.append(waiter)
        assert _line(waiter) == {"ready": True}
        _poll(lambda: _waiters(client, "shared") == 1, why=client.status)
        entry = next(w for w in client.status()["waiters"] if w["name"] == "shared")
        assert entry["who"]["worker"] == "gw7"
        assert entry["who"]["pid"] == waiter.pid
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        got = _line(waiter)
        assert got["at"] - killed < 0.5  # freed when the connection drops, not by a TTL
        assert got["token"] > held["token"]
        assert waiter.wait(10) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_one_shot_connections_keep_ttl_only_semantics(broker: Broker, client: Client) -> None:
    with Raw(broker.path) as raw:  # no hello: a Node-style client
        answer = raw.ask({"action": "lock", "name": "n", "ttl": 300})
    assert answer["ok"] is True
    time.sleep(0.05)  # its connection is closed: the lock stays until its TTL
    with pytest.raises(BrokerTimeout), client.lock("n", timeout=0.1):
        pass
    with client.lock("n", timeout=5) as token:
        assert token == answer["token"] + 1


def test_a_closed_one_shot_waiter_is_never_granted(broker: Broker, client: Client) -> None:
    with client.lock("n"):
        raw = Raw(broker.path)
        raw.send({"action": "lock", "name": "n"})
        _poll(lambda: _waiters(client, "n") == 1)
        raw.close()
        _poll(lambda: _waiters(client, "n") == 0)
    with client.lock("n", timeout=0):  # free: nobody was handed it
        pass


def test_wire_answers(broker: Broker) -> None:
    with Raw(broker.path) as raw:
        assert raw.ask({"action": "add", "key": "a", "value": 1, "ttl": 1000})["added"] is True
        assert raw.ask({"action": "incr", "key": "n", "amount": 2}) == {"ok": True, "value": 2}
        assert raw.ask({"action": "incr", "key": "a", "amount": 1.5})["error"] == "bad_request"
        assert raw.ask({"action": "lock", "name": ""})["error"] == "bad_request"
        assert raw.ask({"action": "lock", "name": "x", "timeout": -1})["error"] == "bad_request"
        assert raw.ask({"action": "lock", "name": "x", "ttl": 0})["error"] == "invalid_ttl"
        assert raw.ask({"action": "unlock", "name": "x", "token": 9}) == {
            "ok": True,
            "released": False,
        }
        assert raw.ask({"action": "pool", "name": "p", "items": "ab"})["error"] == "bad_request"
        assert raw.ask({"action": "pool", "name": "p", "items": []})["error"] == "bad_request"
        assert raw.ask({"action": "barrier", "name": "b", "parties": 0})["error"] == "bad_request"
        assert raw.ask({"action": "throttle", "name": "t", "calls": 1})["error"] == "bad_request"
        assert raw.ask({"action": "push", "queue": "q", "items": [1, 2]}) == {
            "ok": True,
            "length": 2,
        }
        assert raw.ask({"action": "pop", "queue": "q"}) == {"ok": True, "value": 1}
        assert raw.ask({"action": "once", "key": "o"}) == {"ok": True, "status": "compute"}
        failed = raw.ask({"action": "once_fail", "key": "o", "message": "m", "errorType": "E"})
        assert failed == {"ok": True, "status": "failed"}
        again = raw.ask({"action": "once", "key": "o"})
        assert again["error"] == "once_failed"
        assert (again["message"], again["errorType"]) == ("m", "E")
        status = raw.ask({"action": "status"})
        assert set(status) == {"ok", "holders", "waiters", "sessions", "time"}


def test_a_thread_waiting_never_blocks_the_release_by_another(broker: Broker) -> None:
    with Client(broker.path) as shared:  # one client, two threads, one lock
        held = shared.lock("L")
        held.__enter__()
        got: list[int] = []
        thread = threading.Thread(
            target=lambda: got.append(shared.lock("L", timeout=10).__enter__())
        )
        thread.start()
        _poll(lambda: _waiters(shared, "L") == 1)  # other requests still go through
        assert shared.incr("n") == 1
        held.__exit__(None, None, None)
        thread.join(10)
        assert got == [2]


def test_async_tasks_share_a_client_and_cancelling_a_wait_keeps_other_claims(
    broker: Broker,
) -> None:
    async def main() -> None:
        async with AsyncClient(broker.path) as client:
            async with client.lock("A") as token:
                waiter = asyncio.create_task(client.lock("A", timeout=30).__aenter__())
                while not [w for w in (await client.status())["waiters"] if w["name"] == "A"]:
                    await asyncio.sleep(0.005)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                # The cancelled wait closed only its own connection: A is still ours.
                with Client(broker.path) as other, pytest.raises(BrokerTimeout):
                    other.lock("A", timeout=0).__enter__()
                assert token == 1
            async with client.lock("A", timeout=5) as again:
                assert again == 2

            async def compute() -> str:
                await asyncio.sleep(0.01)
                return "async value"

            assert await client.once("o", compute, ttl=60) == "async value"
            assert await client.once("o", compute, ttl=60) == "async value"

    asyncio.run(main())


def test_once_with_the_same_client_inside_compute(client: Client) -> None:
    def compute() -> int:
        return client.incr("inside")  # the compute claim waits on another connection

    assert client.once("k", compute, ttl=60) == 1

    def explode() -> None:
        raise KeyError("missing thing")

    with pytest.raises(KeyError):
        client.once("bad", explode, ttl=60)
    with pytest.raises(OnceFailed) as failed:
        client.once("bad", lambda: 1)
    assert failed.value.error_type == "KeyError"
    assert "missing thing" in failed.value.message


def test_lock_ttl_and_timeouts_map_to_the_documented_errors(client: Client) -> None:
    held = client.lock("l", ttl=0.05)
    held.__enter__()
    time.sleep(0.2)
    with pytest.raises(ClaimLost):
        held.__exit__(None, None, None)
    with client.lock("l", timeout=0), pytest.raises(WaitTimeout) as timed_out:
        client.pop("empty", timeout=0.05)
    assert isinstance(timed_out.value, TimeoutError)
    assert client.barrier("b", 1, timeout=0) == 0
    with pytest.raises(InvalidRequest):
        client.barrier("b", 2, timeout=0)  # declared with another number of parties


def test_stopping_the_broker_answers_waiters(make_broker: Any) -> None:
    broker = make_broker(require_ttl=False)
    client = Client(broker.path)
    errors: list[BaseException] = []

    def pop() -> None:
        try:
            client.pop("q")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=pop)
    thread.start()
    with Client(broker.path) as observer:
        _poll(lambda: _waiters(observer, "q") == 1)
    broker.stop()
    thread.join(10)
    client.close()
    assert len(errors) == 1
    assert "draining" in str(errors[0]) or "closed" in str(errors[0])


def test_corral_status_shows_holders_and_waiters(broker: Broker, client: Client) -> None:
    client.pool("dbs", ["db-1"])
    with client.acquire("dbs", ttl=60):
        thread = threading.Thread(target=lambda: client.acquire("dbs", timeout=10).__enter__())
        thread.start()
        _poll(lambda: _waiters(client, "dbs") == 1)
        env = {**os.environ, "EPHEMERAL_PIPE": broker.path}
        env.pop("CORRAL_BROKER_URL", None)
        result = corral("status", env=env)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        as_json = corral("status", "--json", env=env).stdout
    thread.join(10)
    assert "HOLDERS (1)" in out
    assert "item 'db-1'" in out
    assert f"pid {os.getpid()}" in out
    assert "WAITERS (1)" in out
    status = json.loads(as_json)
    assert status["holders"][0]["kind"] == "pool"
    assert 0 < status["holders"][0]["ttl_left"] <= 60


def test_holdings_and_status_from_the_broker_process(broker: Broker, client: Client) -> None:
    client.lease("slots", "gw0", ttl=60)
    with client.lock("migrations", ttl=30) as token:
        held = broker.holdings()
        status = broker.status()
    assert {(h["kind"], h["key"]) for h in held} == {("lease", "slots"), ("lock", "migrations")}
    lock = next(h for h in held if h["kind"] == "lock")
    assert lock["value"] == token
    assert lock["connection"] is not None
    assert lock["expires"] is not None
    assert {h["kind"] for h in status["holders"]} == {"lease", "lock"}
    assert [h["kind"] for h in broker.holdings()] == ["lease"]  # the lock: released on exit


def test_waits_outlast_the_clients_own_timeout(broker: Broker) -> None:
    with Client(broker.path, timeout=0.1) as impatient, Client(broker.path) as holder:
        held = holder.lock("slow")
        held.__enter__()
        timer = threading.Timer(0.4, lambda: held.__exit__(None, None, None))
        timer.start()
        started = time.monotonic()
        with impatient.lock("slow"):  # timeout=None: waits past the client's 0.1 s
            assert time.monotonic() - started >= 0.35
        timer.join()
        with pytest.raises(WaitTimeout):
            impatient.pop("nothing", timeout=0.3)  # decided by the broker, not the socket
        assert impatient.ping() > 0  # the connection is still in sync


def test_closing_a_client_ends_its_waits(broker: Broker) -> None:
    client = Client(broker.path)
    errors: list[BaseException] = []

    def pop() -> None:
        try:
            client.pop("never")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=pop)
    thread.start()
    with Client(broker.path) as observer:
        _poll(lambda: _waiters(observer, "never") == 1)
        client.close()
        thread.join(5)
        assert not thread.is_alive()
        assert isinstance(errors[0], BrokerUnavailable)
        _poll(lambda: _waiters(observer, "never") == 0)

    async def main() -> None:
        aclient = AsyncClient(broker.path)
        task = asyncio.create_task(aclient.pop("never"))
        async with AsyncClient(broker.path) as observer:
            while not [w for w in (await observer.status())["waiters"] if w["name"] == "never"]:
                await asyncio.sleep(0.005)
        await aclient.aclose()
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_large_values_are_compressed_through_once_and_add(broker: Broker) -> None:
    big = {"rows": ["x" * 50] * 2000}  # ~100 KB of JSON, sent gzip+base64
    with Client(broker.path) as a, Client(broker.path) as b:
        started = threading.Event()
        release = threading.Event()
        got: list[Any] = []

        def compute() -> Any:
            started.set()
            release.wait(10)
            return big

        thread = threading.Thread(target=lambda: got.append(a.once("big", compute, ttl=60)))
        thread.start()
        assert started.wait(10)
        waiter = threading.Thread(target=lambda: got.append(b.once("big", lambda: None)))
        waiter.start()
        _poll(lambda: _waiters(b, "big") == 1)
        release.set()
        thread.join(10)
        waiter.join(10)
        assert got == [big, big]  # the waiter decoded the compressed answer
        assert b.once("big", lambda: None) == big
        assert b.get("big") == big
        assert a.add("big-too", big, ttl=60) is True
        assert b.get("big-too") == big


def test_an_interrupted_compute_hands_the_claim_to_a_waiter(broker: Broker) -> None:
    with Client(broker.path) as a, Client(broker.path) as b:
        started, stop = threading.Event(), threading.Event()
        outcome: list[Any] = []

        def interrupted() -> Any:
            started.set()
            stop.wait(10)
            raise KeyboardInterrupt  # Ctrl-C: not a failure of compute

        def first() -> None:
            try:
                a.once("k", interrupted, ttl=60)
            except KeyboardInterrupt:
                outcome.append("interrupted")

        thread = threading.Thread(target=first)
        thread.start()
        assert started.wait(10)
        second = threading.Thread(target=lambda: outcome.append(b.once("k", lambda: "b")))
        second.start()
        _poll(lambda: _waiters(a, "k") == 1)
        stop.set()
        thread.join(10)
        second.join(10)
        assert sorted(outcome) == ["b", "interrupted"]  # b was elected, not failed
        assert a.once("k", lambda: "never") == "b"


def test_a_cancelled_async_compute_hands_the_claim_to_a_waiter(broker: Broker) -> None:
    async def main() -> None:
        async with AsyncClient(broker.path) as a, AsyncClient(broker.path) as b:
            started = asyncio.Event()

            async def forever() -> str:
                started.set()
                await asyncio.sleep(3600)
                return "never"

            async def failing() -> str:
                raise ValueError("bad input 42")

            computing = asyncio.create_task(a.once("k", forever, ttl=60))
            await started.wait()
            waiter = asyncio.create_task(b.once("k", lambda: "from b", ttl=60))
            while not [w for w in (await a.status())["waiters"] if w["name"] == "k"]:
                await asyncio.sleep(0.005)
            computing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await computing
            assert await asyncio.wait_for(waiter, 5) == "from b"
            with pytest.raises(ValueError, match="bad input 42"):
                await a.once("f", failing)
            with pytest.raises(OnceFailed, match="bad input 42"):
                await b.once("f", failing)

    asyncio.run(main())
