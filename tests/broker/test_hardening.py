"""Issue 16's defects, each kept as a regression test: what a hostile client, a crash or
a loaded machine found in the broker (numbers, counters, TTLs, limits)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.broker import AsyncClient, Broker, Client
from corral.broker.messages import Rejected, Request
from corral.broker.protocol import ServerConnection
from corral.errors import (
    ERROR_CODES,
    BrokerTimeout,
    CapacityExceeded,
    CounterOverflow,
    InvalidValue,
)
from tests.broker._raw import Raw

MakeBroker = Callable[..., Broker]


def _hello(raw: Raw) -> None:
    assert raw.ask({"action": "hello"})["ok"]


# ------------------------------------------------------------------ 1. numbers at the door


@pytest.mark.parametrize(
    ("line", "path"),
    [
        (b'{"action":"set","key":"k","value":1e400}', "value"),
        (b'{"action":"set","key":"k","value":-1e400}', "value"),
        (b'{"action":"set","key":"k","value":{"a":[1,2,1E999]}}', "value.a[2]"),
        (b'{"action":"set","key":"k","value":NaN}', "value"),
        (b'{"action":"set","key":"k","value":[Infinity]}', "value[0]"),
        (b'{"action":"push","queue":"q","items":[-Infinity]}', "items[0]"),
        (b'{"action":"set","key":"k","value":{"x\\"y":1e400}}', 'value["x\\"y"]'),
        (b'{"action":"set","key":"k","ttl":1e400,"value":1}', "ttl"),
    ],
)
def test_out_of_range_numbers_are_refused_with_their_path(line: bytes, path: str) -> None:
    conn = ServerConnection()
    conn.receive_data(line + b'\n{"action":"ping"}\n')
    rejected = conn.next_event()
    assert isinstance(rejected, Rejected)
    assert rejected.code == "invalid_value"
    assert f"at {path}:" in rejected.detail
    assert isinstance(conn.next_event(), Request)  # the connection goes on


def test_a_long_number_is_named_briefly() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"action":"set","key":"k","value":1' + b"0" * 100_000 + b".5}\n")
    rejected = conn.next_event()
    assert isinstance(rejected, Rejected)
    assert rejected.code == "invalid_value"
    assert len(rejected.detail) < 200
    assert "100003 characters" in rejected.detail


@pytest.mark.parametrize("tail", [b"[" * 5000 + b"]" * 5000, b"[" * 5000, b"nonsense"])
def test_a_bad_number_before_deep_or_broken_json_is_still_refused(tail: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"action":"push","queue":"q","items":[1e400,' + tail + b"]}\n")
    rejected = conn.next_event()
    assert isinstance(rejected, Rejected)
    assert rejected.code == "invalid_value"


def test_small_and_tiny_floats_still_pass() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"action":"set","key":"k","value":[1.5e308,1e-400,-0.0,2.5]}\n')
    event = conn.next_event()
    assert isinstance(event, Request)
    assert event.obj["value"] == [1.5e308, 0.0, -0.0, 2.5]


def test_a_refused_number_leaves_the_key_readable(broker: Broker) -> None:
    with Raw(broker.path) as r:
        assert r.ask({"action": "set", "key": "k", "value": 1}) == {"ok": True}
        answer = r.ask(b'{"action":"set","key":"k","value":1e400}\n')
        assert answer["error"] == "invalid_value"
        assert r.ask({"action": "get", "key": "k"})["value"] == 1


def test_a_refused_push_neither_loses_an_item_nor_strands_the_popper(broker: Broker) -> None:
    with Raw(broker.path) as popper, Raw(broker.path) as pusher:
        _hello(popper)
        popper.send({"action": "pop", "queue": "q", "timeout": 5000})
        time.sleep(0.05)
        answer = pusher.ask(b'{"action":"push","queue":"q","items":[1e400]}\n')
        assert answer["error"] == "invalid_value"
        assert pusher.ask({"action": "push", "queue": "q", "items": [7]})["ok"]
        assert popper.recv() == {"ok": True, "value": 7}


def test_a_refused_once_done_leaves_the_claim_and_the_waiter(broker: Broker) -> None:
    with Raw(broker.path) as computer, Raw(broker.path) as waiter:
        _hello(computer)
        _hello(waiter)
        assert computer.ask({"action": "once", "key": "o"})["status"] == "compute"
        waiter.send({"action": "once", "key": "o", "timeout": 5000})
        time.sleep(0.05)
        answer = computer.ask(b'{"action":"once_done","key":"o","value":{"v":NaN}}\n')
        assert answer["error"] == "invalid_value"
        assert computer.ask({"action": "once_done", "key": "o", "value": 3})["status"] == "stored"
        assert waiter.recv()["value"] == 3


def test_an_answer_that_cannot_be_written_still_answers_the_waiter(broker: Broker) -> None:
    """Belt and braces: if encoding a waiter's answer ever fails, it gets an error."""
    with Raw(broker.path) as popper:
        _hello(popper)
        popper.send({"action": "pop", "queue": "q", "timeout": 5000})
        time.sleep(0.05)
        core = broker._core_or_raise()
        loop = broker._loop
        assert loop is not None
        done = threading.Event()

        def push_unsendable() -> None:
            core.store.push("q", [{1, 2}], 10)  # a set: nothing the wire could carry
            done.set()

        loop.call_soon_threadsafe(push_unsendable)
        assert done.wait(5)
        answer = popper.recv()
        assert answer["ok"] is False
        assert answer["error"] == "internal_error"
        assert "could not be encoded" in answer["detail"]
        assert popper.ask({"action": "ping"})["ok"]  # the connection goes on


# ------------------------------------------------------------------ 2. counters


def test_counters_are_signed_64_bit(broker: Broker) -> None:
    top = 2**63 - 1
    with Client(broker.path) as c:
        assert c.incr("n", top) == top
        with pytest.raises(CounterOverflow):
            c.incr("n")
        assert c.get("n") == top  # unchanged
        assert c.incr("n", -top) == 0
        assert c.incr("m", -(2**63)) == -(2**63)
        with pytest.raises(CounterOverflow):
            c.incr("m", -1)
        with pytest.raises(CounterOverflow):
            c.incr("fresh", 2**63)
        assert c.get("fresh", None) is None


def test_a_huge_integer_never_poisons_its_key(broker: Broker) -> None:
    nines = int("9" * 4300)
    with Raw(broker.path) as r:
        line = b'{"action":"set","key":"big","value":' + b"9" * 4300 + b"}\n"
        assert r.ask(line) == {"ok": True}
        answer = r.ask(b'{"action":"incr","key":"big","amount":' + b"9" * 4300 + b"}\n")
        assert answer["error"] == "overflow"
        answer = r.ask({"action": "incr", "key": "big"})
        assert answer["error"] == "overflow"
        assert r.ask({"action": "get", "key": "big"})["value"] == nines
        assert r.ask({"action": "del", "key": "big"})["ok"]


def test_overflow_maps_to_its_class() -> None:
    assert ERROR_CODES["overflow"] is CounterOverflow
    assert ERROR_CODES["invalid_value"] is InvalidValue
    assert issubclass(CounterOverflow, ArithmeticError)
    assert issubclass(InvalidValue, ValueError)


# ------------------------------------------------------------------ 3. one ttl validation


@pytest.mark.parametrize(
    "request_",
    [
        {"action": "set", "key": "k", "value": 1},
        {"action": "add", "key": "k", "value": 1},
        {"action": "incr", "key": "n"},
        {"action": "lease", "key": "k", "workerId": "w"},
        {"action": "once_done", "key": "o", "value": 1},
        {"action": "once_fail", "key": "o", "message": "m", "errorType": "E"},
        {"action": "lock", "name": "l"},
        {"action": "acquire", "name": "p"},
    ],
)
@pytest.mark.parametrize("ttl", [-1, -0.5, "10", True, pytest.param(10**310, id="10**310"), [1]])
def test_every_action_validates_ttl_alike(
    broker: Broker, request_: dict[str, Any], ttl: Any
) -> None:
    with Raw(broker.path) as r:
        r.ask({"action": "pool", "name": "p", "items": [1]})
        r.ask({"action": "incr", "key": "n"})
        answer = r.ask({**request_, "ttl": ttl})
        assert answer["ok"] is False
        assert answer["error"] == "invalid_ttl", answer
        assert r.ask({"action": "get", "key": "n"})["value"] == 1  # incr did not apply
        assert r.ask({"action": "get", "key": "o"})["error"] == "not_found"


# ------------------------------------------------------------------ 5. limits for everything


def test_pools_queues_barriers_onces_locks_count_toward_max_items(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker(require_ttl=False, max_items=6)
    with Raw(broker.path) as r, Raw(broker.path) as waiter:
        _hello(r)
        _hello(waiter)
        assert r.ask({"action": "set", "key": "k", "value": 1})["ok"]
        assert r.ask({"action": "pool", "name": "p", "items": [1, 2]})["ok"]
        assert r.ask({"action": "push", "queue": "q", "items": [1]})["ok"]
        assert r.ask({"action": "lock", "name": "l"})["ok"]
        assert r.ask({"action": "once", "key": "o"})["status"] == "compute"
        waiter.send({"action": "barrier", "name": "b", "parties": 2, "timeout": 5000})
        deadline = time.monotonic() + 5
        while r.ask({"action": "stats"})["stats"]["items"] < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = r.ask({"action": "stats"})["stats"]
        assert stats["items"] == 6
        assert stats["objects"] == {
            "keys": 1,
            "pools": 1,
            "queued": 1,
            "locks": 1,
            "onces": 1,
            "barriers": 1,
            "throttles": 0,
        }
        assert stats["capacity"]["atCapacity"] is True
        for request in (
            {"action": "set", "key": "k2", "value": 1},
            {"action": "pool", "name": "p2", "items": [1]},
            {"action": "push", "queue": "q", "items": [2]},
            {"action": "lock", "name": "l2"},
            {"action": "once", "key": "o2"},
            {"action": "barrier", "name": "b2", "parties": 2},
            {"action": "throttle", "name": "t", "calls": 1, "per": 1000},
            {"action": "incr", "key": "n"},
        ):
            answer = r.ask(request)
            assert answer.get("error") == "max_items", (request, answer)
        assert r.ask({"action": "set", "key": "k", "value": 2})["ok"]  # updates still work
        assert r.ask({"action": "pop", "queue": "q"})["value"] == 1  # frees one
        assert r.ask({"action": "lock", "name": "l2"})["ok"]


def test_max_bytes_bounds_pools_and_queues(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=False, max_bytes=200_000, max_value_size=100_000)
    big = ["x" * 20_000]  # about 40 kB each: the items parsed and as canonical JSON
    with Client(broker.path, compress_threshold=None) as c:
        for i in range(4):
            c.pool(f"p{i}", big)
        with pytest.raises(CapacityExceeded, match="max_bytes"):
            c.pool("p4", big)
        with pytest.raises(CapacityExceeded, match="max_bytes"):
            c.push("q", "y" * 40_000, "z" * 40_000)
        with pytest.raises(CapacityExceeded, match="max_bytes"):
            c.set("k", "y" * 50_000)
        stats = c.stats()
        assert 160_000 < stats["memory"]["approximateStoreBytes"] <= 200_000
        assert stats["memory"]["maxBytes"] == 200_000


def test_a_pool_is_a_value_under_max_value_size(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=False, max_value_size=1000)
    with Raw(broker.path) as r:
        answer = r.ask({"action": "pool", "name": "p", "items": ["x" * 2000]})
        assert answer["error"] == "too_large"


# ------------------------------------------------------------------ 4. backlog, busy broker


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_backlog_is_what_the_docs_say(broker: Broker) -> None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            expected = min(4096, int(f.read()))
    except OSError:
        expected = 4096
    out = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if broker.path in line.split()]
    assert len(rows) == 1, out
    assert int(rows[0][3]) == expected  # Send-Q of a listening socket: its backlog


def _full_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose backlog is full: the next connect gets EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    filler: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return listener, filler
        filler.append(sock)


def _serve_after(listener: socket.socket, delay: float, stop: threading.Event) -> None:
    """After *delay*, drain the backlog and answer ``hello`` like a broker would."""
    time.sleep(delay)
    listener.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(0.2)
            try:
                line = conn.recv(65536)
            except TimeoutError:
                continue  # a filler connection: it never speaks
            if b'"hello"' in line:
                conn.sendall(
                    b'{"ok":true,"server":"corral","version":1,"instance":"x",'
                    b'"session":1,"auth":"none"}\n'
                )
                stop.wait(5)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_busy_broker_is_retried_until_the_timeout(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "busy.sock")
    listener, filler = _full_listener(path)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerTimeout, match="busy"):
            _connect(kind, path, timeout=0.5)
        assert time.monotonic() - started >= 0.45  # not 0.2 ms: it retried
    finally:
        for sock in filler:
            sock.close()
        listener.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_broker_that_gets_free_is_reached(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "busy.sock")
    listener, filler = _full_listener(path)
    stop = threading.Event()
    server = threading.Thread(target=_serve_after, args=(listener, 0.3, stop), daemon=True)
    server.start()
    try:
        started = time.monotonic()
        _connect(kind, path, timeout=5)
        assert time.monotonic() - started >= 0.25
    finally:
        stop.set()
        server.join(5)
        for sock in filler:
            sock.close()
        listener.close()


def _connect(kind: str, path: str, timeout: float) -> None:
    if kind == "sync":
        with Client(path, timeout=timeout) as c:
            c.connect()
        return

    async def main() -> None:
        async with AsyncClient(path, timeout=timeout) as c:
            await c.connect()

    asyncio.run(main())
