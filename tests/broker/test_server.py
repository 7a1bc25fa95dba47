"""The broker over real sockets: files and permissions, every error code, ordering, limits."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.broker import Broker, Client
from corral.errors import BrokerAlreadyRunning, BrokerError, BrokerUnavailable
from tests.broker._raw import Raw

MakeBroker = Callable[..., Broker]


def test_private_directory_socket_and_cleanup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPHEMERAL_PIPE", "previous")
    monkeypatch.delenv("EPHEMERAL_SECRET", raising=False)
    broker = Broker(secret="hunter2")
    path = broker.start()
    try:
        assert os.environ["EPHEMERAL_PIPE"] == path
        assert os.environ["EPHEMERAL_SECRET"] == "hunter2"
        directory = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert broker.start() == path  # starting twice is a no-op
        other = Broker()
        assert other.start() != path  # random names
        other.stop()
    finally:
        broker.stop()
    assert not os.path.exists(path)
    assert not os.path.exists(directory)
    assert os.environ["EPHEMERAL_PIPE"] == "previous"
    assert "EPHEMERAL_SECRET" not in os.environ
    broker.stop()  # idempotent
    assert not broker.running


def test_secret_never_shows(make_broker: MakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="corral")
    broker = make_broker(secret="hunter2-secret", debug=True)
    with Client(broker.path, secret="wrong-secret") as c, pytest.raises(BrokerError) as info:
        c.ping()
    with Client(broker.path, secret="hunter2-secret") as c:
        c.ping()
    assert "session 2: ping None" in caplog.text  # debug=True logs every request
    for text in (repr(broker), str(info.value), caplog.text, repr(c)):
        assert "hunter2" not in text
        assert "wrong-secret" not in text


def test_stale_socket_is_replaced_and_live_one_refused(
    make_broker: MakeBroker, tmp_path: Path
) -> None:
    path = str(tmp_path / "b.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a crashed broker leaves this behind: nothing listens
    broker = make_broker(socket_path=path)
    assert broker.path == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(BrokerAlreadyRunning, match="already running"):
        Broker(socket_path=path).start()
    with Client(path) as c:  # the live broker was left alone
        assert c.ping() >= 0
    broker.stop()
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []


def test_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(BrokerError, match="not a socket"):
        Broker(socket_path=path).start()
    assert path.read_text() == "precious"


def test_restart_at_the_same_path(make_broker: MakeBroker, tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    first = make_broker(socket_path=path, require_ttl=False)
    with Client(path) as c:
        c.set("a", 1)
        first.stop()
        make_broker(socket_path=path, require_ttl=False)
        # The old connection is gone; the request had not been sent, so it reconnects.
        assert c.get("a", "gone") == "gone"
        assert c.reconnects == 1


def test_every_node_error_code(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=True, max_items=2, max_value_size=100, max_request_size=4096)
    with Raw(broker.path) as r:
        ask = r.ask
        assert ask({"action": "get", "key": "nope"})["error"] == "not_found"
        assert ask({"action": "set", "key": "a", "value": 1})["error"] == "ttl_required"
        assert ask({"action": "set", "key": "a", "value": 1, "ttl": 0})["error"] == "invalid_ttl"
        assert ask({"action": "set", "key": "a", "value": 1, "ttl": -5})["error"] == "invalid_ttl"
        assert ask({"action": "set", "key": "a", "value": 1, "ttl": "x"})["error"] == "invalid_ttl"
        big = {"action": "set", "key": "a", "value": "x" * 101, "ttl": 1000}
        assert ask(big)["error"] == "too_large"
        assert ask({"action": "set", "key": "a", "value": 1, "ttl": 30})["ok"] is True
        assert ask({"action": "set", "key": "b", "value": 1, "ttl": 30})["ok"] is True
        assert ask({"action": "set", "key": "c", "value": 1, "ttl": 30})["error"] == "max_items"
        assert ask({"action": "set", "key": "a", "value": 2, "ttl": 30})["ok"] is True
        assert ask({"action": "set", "key": "e", "value": 1, "ttl": 1})["error"] == "max_items"
        assert ask({"action": "del", "key": "b"}) == {"ok": True, "deleted": True}
        assert ask({"action": "set", "key": "e", "value": 1, "ttl": 1})["ok"] is True
        time.sleep(0.01)
        assert ask({"action": "get", "key": "e"})["error"] == "expired"
        assert ask({"action": "lease", "key": "k"})["error"] == "key_and_worker_required"
        # corral adds the lease's fencing token; Node clients ignore extra fields.
        assert ask({"action": "lease", "key": "k", "workerId": "w"}) == {
            "ok": True,
            "value": 0,
            "token": 1,
        }
        lease2 = ask({"action": "lease", "key": "j", "workerId": "w"})
        assert lease2["error"] == "worker_already_has_lease"
        assert ask({"action": "release"})["error"] == "worker_required"
        assert ask({"action": "release", "workerId": "w"}) == {"ok": True, "released": True}
        assert ask(b"{nope\n")["error"] == "invalid_json"
        assert ask({"action": "fly"})["error"] == "unknown_action"
        assert ask({"key": "no action"})["error"] == "unknown_action"
        assert ask({"action": "get", "key": 5})["error"] == "bad_request"
        # corral explains; Node clients ignore the extra field.
        assert "'fly'" in ask({"action": "fly"})["detail"]
        assert ask(b'{"action":"set","key":"a","value":"' + b"x" * 5000 + b'"}\n') == {
            "ok": False,
            "error": "too_large",
            "detail": "request line over max_request_size=4096 bytes",
        }
        assert r.at_eof()  # too_large on a request closes that connection
    with Client(broker.path, secret="s") as c:
        c.ping()  # an open broker does not mind a client with a secret
    secured = make_broker(secret="s")
    with Raw(secured.path) as r:
        assert r.ask({"action": "ping"})["error"] == "auth_failed"
    with Raw(broker.path) as before:
        assert before.ask({"action": "ping"})["ok"] is True
        broker._core.draining = True  # type: ignore[union-attr]  # what stop() sets first
        assert before.ask({"action": "ping"})["error"] == "draining"
        with Raw(broker.path) as late:  # a connection during shutdown is told, then closed
            assert late.recv()["error"] == "draining"
            assert late.at_eof()


def test_success_shapes_match_node(broker: Broker) -> None:
    with Raw(broker.path) as r:
        assert r.ask({"action": "set", "key": "k", "value": [1], "ttl": 5000}) == {"ok": True}
        assert r.ask({"action": "get", "key": "k"}) == {
            "ok": True,
            "value": [1],
            "compressed": False,
        }
        items = r.ask({"action": "list"})["items"]
        assert items["k"]["hasValue"] is True
        assert abs(items["k"]["expires"] - (time.time() * 1000 + 5000)) < 2000
        assert abs(r.ask({"action": "ping"})["pong"] - time.time() * 1000) < 2000
        stats = r.ask({"action": "stats"})["stats"]
        assert {"items", "leases", "capacity", "memory", "uptime"} <= set(stats)
        assert set(stats["capacity"]) == {
            "items",
            "maxItems",
            "utilization",
            "nearCapacity",
            "atCapacity",
            "warning",
        }
        health = r.ask({"action": "health"})
        assert health["status"] == "healthy"
        assert {"uptime", "timestamp", "capacity", "memory", "connections"} <= set(health)
        metrics = r.ask({"action": "metrics"})
        assert metrics["format"] == "prometheus"
        assert (
            'ephemeral_broker_operations_total{action="get",result="success"} 1'
            in metrics["metrics"]
        )


def test_capacity_warnings(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=False, max_items=10)
    with Client(broker.path) as c:
        for i in range(9):
            c.set(f"k{i}", i)
        assert c.stats()["capacity"]["warning"] == "near_capacity"
        assert c.health()["status"] == "degraded"
        c.set("k9", 9)
        capacity = c.stats()["capacity"]
        assert capacity["atCapacity"] is True
        assert capacity["warning"] == "at_capacity"
        assert capacity["utilization"] == 1.0


def test_pipelined_requests_are_answered_in_order(broker: Broker) -> None:
    with Raw(broker.path) as r:
        requests: list[dict[str, object] | bytes] = []
        for i in range(2000):
            requests.append({"action": "set", "key": f"k{i % 7}", "value": i})
            requests.append({"action": "get", "key": f"k{i % 7}"})
            requests.append(b"garbage\n" if i % 100 == 0 else {"action": "ping"})
        r.send(*requests)
        for i in range(2000):
            assert r.recv() == {"ok": True}
            assert r.recv()["value"] == i
            third = r.recv()
            assert third["ok"] is (i % 100 != 0)


def test_ttl_expires_on_time_without_any_request(broker: Broker) -> None:
    with Client(broker.path) as c:
        c.set("short", 1, ttl=0.05)
        c.set("long", 1, ttl=60)
        deadline = time.monotonic() + 5
        while c.stats()["items"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.stats()["items"] == 1  # removed by the deadline timer, not by a get
        assert 'ephemeral_broker_expired_total{type="items"} 1' in c.metrics()


def test_garbage_half_lines_and_dropped_connections_do_not_hurt(broker: Broker) -> None:
    with Client(broker.path) as c:
        c.set("alive", True)
        for blob in (os.urandom(5000), b"\x00" * 100 + b"\n", b'{"action":"get","key":"al'):
            s = socket.socket(socket.AF_UNIX)
            s.connect(broker.path)
            s.sendall(blob)
            s.close()
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(broker.path)
            s.close()
        assert c.get("alive") is True
        deadline = time.monotonic() + 5
        while c.stats()["connections"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.stats()["connections"] == 1


def test_a_client_that_never_reads_does_not_stall_others(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=False, drain_timeout=0.5)
    value = "v" * 200_000
    with Client(broker.path) as c:
        c.set("big", value)
        hog = socket.socket(socket.AF_UNIX)
        hog.connect(broker.path)
        hog.setblocking(False)
        request = b'{"action":"get","key":"big"}\n'
        sent = 0
        try:
            for _ in range(20_000):  # send until our own buffer is full: it never reads
                sent += hog.send(request * 50)
        except BlockingIOError:
            pass
        assert sent > 0
        started = time.monotonic()
        for _ in range(50):
            assert c.get("big") == value
        assert time.monotonic() - started < 5
        rss = c.stats()["memory"]["rss"]
        assert rss < 1024**3  # answers for the hog are not piling up without bound
        hog.close()
        broker.stop()  # the hog's unread answers cannot hold up stop()


def test_leases_die_with_a_persistent_connection_not_a_one_shot(broker: Broker) -> None:
    holder = Client(broker.path)
    assert holder.lease("db", "w1") == 0
    with Raw(broker.path) as r:
        assert r.ask({"action": "lease", "key": "db", "workerId": "node"})["value"] == 1
    holder.close()
    with Client(broker.path) as c:
        deadline = time.monotonic() + 5
        while c.stats()["leases"] != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert c.lease("db", "w2") == 0  # w1's number is free at once; node's (TTL) is not


def test_idle_timeout_stops_the_broker(make_broker: MakeBroker) -> None:
    broker = make_broker(idle_timeout=0.2)
    path = broker.path
    with Client(path) as c:
        c.ping()
        time.sleep(0.4)
        assert broker.running  # an open connection keeps it alive
    assert broker.wait(5)
    broker.stop()
    assert not os.path.exists(path)


def test_stop_closes_connections(make_broker: MakeBroker) -> None:
    broker = make_broker()
    c = Client(broker.path)
    c.ping()
    broker.stop()
    with pytest.raises(BrokerUnavailable):
        c.ping()
    c.close()


def test_async_with_inside_a_running_loop() -> None:
    from corral.broker import AsyncClient

    async def main() -> None:
        async with Broker(require_ttl=False) as broker:
            path = broker.path
            async with AsyncClient(path) as c:
                await c.set("k", {"v": 1})
                assert await c.get("k") == {"v": 1}
            with Client(path) as sync:  # a blocking client in a coroutine does not deadlock
                assert sync.get("k") == {"v": 1}
        assert not os.path.exists(path)

    asyncio.run(main())


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="default_ttl"):
        Broker(default_ttl=0)
    with pytest.raises(ValueError, match="max_value_size"):
        Broker(max_value_size=0)
    with pytest.raises(ValueError, match="secret"):
        Broker(secret="")


def test_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="shorter socket_path"):
        Broker(socket_path=tmp_path / ("x" * 120)).start()


def test_list_and_stats_json_is_plain(broker: Broker) -> None:
    with Raw(broker.path) as r:
        r.send(b'{"action":"set","key":"\\u00e9","value":"\\ud83d\\ude00"}\n')
        assert r.recv() == {"ok": True}
        assert r.ask({"action": "get", "key": "é"})["value"] == "\U0001f600"
        json.dumps(r.ask({"action": "stats"}))


def test_waiting_requests_hold_back_later_answers(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue-5 seam: a handler that returns a Ticket parks the connection's answers."""
    from corral.broker import _core
    from corral.broker._store import Ticket

    def wait(core: Any, session: Any, obj: dict[str, Any], raw: bytes) -> Ticket:
        ticket = Ticket(obj["name"], session.owner, 0.0)
        core.store.enqueue(ticket, obj.get("timeout"))
        return ticket

    def wake(core: Any, session: Any, obj: dict[str, Any], raw: bytes) -> dict[str, Any]:
        ticket = core.store.next_waiter(obj["name"])
        granted = ticket is not None and ticket.set({"ok": True, "granted": obj["name"]})
        return {"ok": True, "woke": granted}

    monkeypatch.setitem(_core._HANDLERS, "test_wait", wait)
    monkeypatch.setitem(_core._HANDLERS, "test_wake", wake)
    hello = {"action": "hello"}
    with Raw(broker.path) as a, Raw(broker.path) as b, Raw(broker.path) as gone:
        assert a.ask(hello)["ok"]
        assert gone.ask(hello)["ok"]
        a.send(
            {"action": "test_wait", "name": "x"},
            {"action": "set", "key": "after", "value": 1},
            {"action": "ping"},
        )
        a.sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            a.recv()  # neither the wait nor what is behind it is answered yet
        a.sock.settimeout(5)
        assert b.ask({"action": "get", "key": "after"})["error"] == "not_found"  # not run yet
        assert b.ask({"action": "test_wake", "name": "x"}) == {"ok": True, "woke": True}
        assert a.recv() == {"ok": True, "granted": "x"}
        assert a.recv() == {"ok": True}  # then the set, then the ping: strictly in order
        assert "pong" in a.recv()
        assert b.ask({"action": "get", "key": "after"})["value"] == 1
        started = time.monotonic()
        assert a.ask({"action": "test_wait", "name": "y", "timeout": 0.05})["error"] == "timeout"
        assert time.monotonic() - started < 2  # woken by the deadline heap's timer
        gone.send({"action": "test_wait", "name": "z"})
        while b.ask({"action": "health"})["connections"]["inFlight"] != 1:
            time.sleep(0.005)  # the broker holds gone's ticket
        gone.close()  # its connection closes: the ticket dies with it
        while b.ask({"action": "stats"})["stats"]["connections"] != 2:
            time.sleep(0.005)
        assert b.ask({"action": "test_wake", "name": "z"}) == {"ok": True, "woke": False}


def test_deeply_nested_values_never_break_the_broker(broker: Broker) -> None:
    with Raw(broker.path) as r:
        assert (
            r.ask(b'{"action":"set","key":"d","value":' + b"[" * 50_000 + b"\n")["error"]
            == "invalid_json"
        )
        for depth in (100, 900, 990, 1200):
            nested = b"[" * depth + b"]" * depth
            answer = r.ask(b'{"action":"set","key":"d","value":' + nested + b"}\n")
            assert answer["ok"] or answer["error"] == "invalid_json"
            got = r.ask({"action": "get", "key": "d"})
            assert got["ok"] or got["error"] in ("internal_error", "not_found")
        assert r.ask({"action": "ping"})["ok"] is True


def test_a_broker_that_never_gets_ready_fails_its_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No wait in start-up without a bound: a loop stuck before it is ready makes start()
    # raise (and clean up) instead of hanging the run that starts it.
    from corral.broker import server

    async def stuck(self: Broker, sock: socket.socket, ready: Any, failure: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(server, "_START_TIMEOUT", 0.3)
    monkeypatch.setattr(Broker, "_main", stuck)
    path = tmp_path / "b.sock"
    broker = Broker(socket_path=path)
    with pytest.raises(BrokerError, match=r"failed to start: not ready after 0\.3 s"):
        broker.start()
    assert not path.exists()
