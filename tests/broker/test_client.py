"""Client and AsyncClient against a real broker: API, values, auth, reconnects, timeouts."""

from __future__ import annotations

import asyncio
import base64
import gzip
import inspect
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.broker import AsyncClient, Broker, Client
from corral.errors import (
    AuthFailed,
    BrokerTimeout,
    BrokerUnavailable,
    CapacityExceeded,
    InvalidTTL,
    KeyNotFound,
    LeaseError,
    TooLarge,
    TTLRequired,
)
from tests.broker._raw import Raw

MakeBroker = Callable[..., Broker]

VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**53),
    1.5,
    "",
    "plain",
    "ünïcødé \U0001f600 \u2028",
    [],
    [1, [2, [3]]],
    {},
    {"nested": {"list": [None, False, 1e-9]}, "": "empty key"},
    {"big": "x" * 100_000},  # compressed on the wire
]


def test_public_methods_match_between_sync_and_async() -> None:
    def api(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(fn)
            for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")
        }

    sync, async_ = api(Client), api(AsyncClient)
    assert sync.pop("close") == async_.pop("aclose")
    assert set(sync) == set(async_)
    # lock()/acquire() return context managers (``with`` / ``async with``), not coroutines.
    managers = {"lock", "acquire"}
    for name, signature in sync.items():
        assert signature.parameters.keys() == async_[name].parameters.keys(), name
        for param in signature.parameters:
            assert signature.parameters[param].default == async_[name].parameters[param].default
        if name in managers:
            assert "AsyncContextManager" in str(async_[name].return_annotation), name
        else:
            assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
    # The constructors too, as inspect (help(), editors) shows them; only the blocking
    # client polls for an answer (spin).
    assert list(inspect.signature(Client).parameters) == [
        *inspect.signature(AsyncClient).parameters,
        "spin",
    ]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_any_json_value_round_trips(client: Client, value: Any) -> None:
    client.set("v", value)
    assert client.get("v") == value


def test_not_json_raises_type_error_before_sending(client: Client) -> None:
    for bad in ({1, 2}, object(), float("nan"), b"bytes"):
        with pytest.raises(TypeError):
            client.set("k", bad)
    assert client.keys() == []  # nothing was sent


def test_missing_keys(client: Client, broker: Broker) -> None:
    with pytest.raises(KeyNotFound) as never:
        client.get("never")
    assert isinstance(never.value, KeyError)
    assert not never.value.expired
    assert never.value.key == "never"
    assert "never" in str(never.value)
    assert client.get("never", None) is None
    assert client.get("never", 42) == 42
    client.set("short", 1, ttl=0.001)
    time.sleep(0.01)
    with pytest.raises(KeyNotFound) as expired:
        client.get("short")
    assert expired.value.expired
    assert "expired" in str(expired.value)


def test_delete_keys_lease_release(client: Client) -> None:
    client.set("a", 1)
    client.set("b", 2)
    assert sorted(client.keys()) == ["a", "b"]
    assert client.delete("a") is True
    assert client.delete("a") is False
    assert client.lease("db", "w1") == 0
    assert client.lease("db", "w2", ttl=10) == 1
    with pytest.raises(LeaseError, match="worker_already_has_lease"):
        client.lease("other", "w1")
    assert client.release("w1") is True
    assert client.release("w1") is False


def test_errors_are_mapped(make_broker: MakeBroker) -> None:
    broker = make_broker(require_ttl=True, max_items=1, max_value_size=10)
    with Client(broker.path) as c:
        with pytest.raises(TTLRequired, match="ttl"):
            c.set("k", 1)
        with pytest.raises(InvalidTTL):
            c.set("k", 1, ttl=-1)
        with pytest.raises(TooLarge) as info:
            c.set("k", "x" * 20, ttl=1)
        assert info.value.key == "k"
        c.set("k", 1, ttl=5)
        with pytest.raises(CapacityExceeded, match="max_items"):
            c.set("j", 1, ttl=5)
        with pytest.raises(TypeError):
            c.set("k", 1, ttl="5")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="empty"):
            c.get("")


def test_observability(client: Client) -> None:
    assert 0 < client.ping() < 1000
    client.set("k", "v")
    stats = client.stats()
    assert stats["items"] == 1
    assert stats["memory"]["approximateStoreBytes"] > 0
    assert client.health()["status"] == "healthy"
    assert "ephemeral_broker_requests_total" in client.metrics()


def test_environment_defaults(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    with Client() as c:  # EPHEMERAL_PIPE was set by start()
        assert c.path == broker.path
    monkeypatch.delenv("EPHEMERAL_PIPE")
    with pytest.raises(BrokerUnavailable, match="EPHEMERAL_PIPE"):
        Client()


def test_unreachable_broker_is_a_clear_error(tmp_path: Path) -> None:
    with Client(str(tmp_path / "none.sock")) as c, pytest.raises(BrokerUnavailable) as info:
        c.ping()
    assert "none.sock" in str(info.value)
    assert "corral run" in str(info.value)


def test_compressed_values_interoperate_with_node_clients(broker: Broker, client: Client) -> None:
    value = {"rows": [{"id": i, "name": "ü" * 10} for i in range(200)]}
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    node_wire = base64.b64encode(gzip.compress(text.encode())).decode()
    with Raw(broker.path) as node:  # what the Node client sends for a large value
        request = {
            "action": "set",
            "key": "from-node",
            "value": node_wire,
            "ttl": 60000,
            "compressed": True,
            "beforeSize": len(text),
            "afterSize": len(node_wire),
        }
        assert node.ask(request) == {"ok": True}
        assert client.get("from-node") == value
        client.set("from-python", value)
        answer = node.ask({"action": "get", "key": "from-python"})
        assert answer["compressed"] is True  # what Node's get() checks before gunzip
        assert json.loads(gzip.decompress(base64.b64decode(answer["value"]))) == value
    assert 'ephemeral_broker_compression_total{compressed="true"} 2' in client.metrics()


# ---------------------------------------------------------------------- auth


def test_challenge_response_auth(make_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = make_broker(secret="s3cret", require_ttl=False)
    assert os.environ["EPHEMERAL_SECRET"] == "s3cret"  # for child processes
    monkeypatch.delenv("EPHEMERAL_SECRET")
    with Client(broker.path, secret="s3cret") as c:
        c.set("k", 1)
        assert c.get("k") == 1
    with Client(broker.path, secret=b"wrong") as c, pytest.raises(AuthFailed, match="wrong secret"):
        c.ping()
    with Client(broker.path) as c, pytest.raises(AuthFailed, match="EPHEMERAL_SECRET"):
        c.ping()
    with Client(broker.path, secret="s3cret") as c:
        assert c.stats()["items"] == 1


def test_recorded_conversation_cannot_be_replayed(make_broker: MakeBroker) -> None:
    broker = make_broker(secret="s3cret", require_ttl=False)
    recorded: list[bytes] = []
    real_sendall = socket.socket.sendall

    def spy(self: socket.socket, data: Any, *args: Any) -> None:
        recorded.append(bytes(data))
        real_sendall(self, data, *args)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(socket.socket, "sendall", spy)
        with Client(broker.path, secret="s3cret") as c:
            c.set("k", "v")
    assert [json.loads(line)["action"] for line in recorded] == ["hello", "auth", "set"]
    with Raw(broker.path) as attacker:
        hello = attacker.ask(recorded[0])
        assert hello["auth"] == "challenge"
        assert attacker.ask(recorded[1])["error"] == "auth_failed"  # a new nonce
        assert attacker.ask(recorded[2])["error"] == "auth_failed"


def test_node_style_signed_requests(make_broker: MakeBroker) -> None:
    import hashlib
    import hmac

    broker = make_broker(secret="s3cret", require_ttl=False)
    body = '{"action":"set","key":"k","value":"caf\\u00e9","ttl":5000}'
    mac = hmac.new(b"s3cret", body.encode(), hashlib.sha256).hexdigest()
    with Raw(broker.path) as node:
        assert node.ask((body[:-1] + f',"hmac":"{mac}"}}\n').encode()) == {"ok": True}
        bad = body[:-1] + ',"hmac":"' + "0" * 64 + '"}\n'
        assert node.ask(bad.encode())["error"] == "auth_failed"
    strict = make_broker(secret="s3cret", legacy_hmac=False)
    with Raw(strict.path) as node:
        assert node.ask((body[:-1] + f',"hmac":"{mac}"}}\n').encode())["error"] == "auth_failed"
    with Client(broker.path, secret="s3cret") as c:
        assert c.get("k") == "café"


# ---------------------------------------------------------------------- connections


@pytest.fixture
def silent_server(tmp_path: Path) -> Iterator[str]:
    """A socket that accepts connections and never answers."""
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    yield path
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_timeout_raises_and_drops_the_connection(silent_server: str) -> None:
    with Client(silent_server, timeout=0.2) as c:
        with pytest.raises(BrokerTimeout, match=r"hello.*0\.2"):
            c.ping()
        assert c._sock is None  # a late answer can never be taken for the next one


def test_async_timeout(silent_server: str) -> None:
    async def main() -> None:
        async with AsyncClient(silent_server, timeout=0.2) as c:
            with pytest.raises(BrokerTimeout):
                await c.ping()

    asyncio.run(main())


def test_one_connection_serves_many_threads(broker: Broker, client: Client) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                client.set(f"t{n}", i)
                assert client.get(f"t{n}") == i
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert client.stats()["connections"] == 1


# Python 3.12+ warns about fork() in a multi-threaded process (the broker thread); the
# child here only uses its client socket, never a lock the broker thread could hold.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_gets_its_own_connection(broker: Broker, client: Client) -> None:
    client.set("k", "parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            client.set("k", "child")
            os._exit(0 if client.get("k") == "child" else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.get("k") == "child"  # the parent's connection still works
    assert client.ping() > 0


def test_closed_client_refuses(broker: Broker) -> None:
    c = Client(broker.path)
    c.ping()
    c.close()
    c.close()
    with pytest.raises(BrokerUnavailable, match="closed"):
        c.ping()


# ---------------------------------------------------------------------- async


def test_async_client_end_to_end(make_broker: MakeBroker) -> None:
    broker = make_broker(secret="s", require_ttl=False)

    async def main() -> None:
        async with AsyncClient(broker.path, secret="s") as c:
            assert await c.ping() > 0
            for value in VALUES:
                await c.set("v", value, ttl=30)
                assert await c.get("v") == value
            await asyncio.gather(*(c.set(f"k{i}", i) for i in range(50)))
            got = await asyncio.gather(*(c.get(f"k{i}") for i in range(50)))
            assert got == list(range(50))
            assert await c.get("missing", "d") == "d"
            with pytest.raises(KeyNotFound):
                await c.get("missing")
            assert await c.delete("k1") is True
            assert len(await c.keys()) == 50
            assert await c.lease("db", "w") == 0
            assert await c.release("w") is True
            assert (await c.stats())["items"] == 50
            assert (await c.health())["status"] == "healthy"
            assert "ephemeral_broker" in await c.metrics()
            with pytest.raises(TypeError):
                await c.set("bad", {1})
        async with AsyncClient(broker.path, secret="nope") as c:
            with pytest.raises(AuthFailed):
                await c.ping()

    asyncio.run(main())


def test_async_client_reconnects_after_a_restart(make_broker: MakeBroker, tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    first = make_broker(socket_path=path, require_ttl=False)

    async def main() -> None:
        async with AsyncClient(path) as c:
            await c.set("a", 1)
            await asyncio.to_thread(first.stop)
            await asyncio.to_thread(make_broker, socket_path=path, require_ttl=False)
            await asyncio.sleep(0.05)  # let the loop see the old connection's EOF
            assert await c.get("a", "gone") == "gone"
            assert c.reconnects == 1

    asyncio.run(main())


def test_async_cancellation_mid_request_never_desynchronises(silent_server: str) -> None:
    async def main() -> None:
        async with AsyncClient(silent_server, timeout=5) as c:
            task = asyncio.create_task(c.ping())
            await asyncio.sleep(0.1)  # the hello is out, its answer never comes
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert c._link is None  # dropped: a late answer cannot be taken for the next

    asyncio.run(main())


def test_async_client_belongs_to_one_event_loop(broker: Broker) -> None:
    client = AsyncClient(broker.path)
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(client.set("k", 1))

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="another event loop"):
                await client.get("k")

        asyncio.run(elsewhere())
        assert first.run_until_complete(client.get("k")) == 1
        first.run_until_complete(client.aclose())
    finally:
        first.close()
