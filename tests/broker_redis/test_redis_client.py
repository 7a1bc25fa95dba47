"""What only the Redis backend has: URL/env selection, run isolation, sessions, scripts."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral import AsyncClient, Client
from corral._versions import installed, release
from corral.broker.redis import AsyncRedisClient, RedisClient
from corral.errors import BrokerUnavailable, KeyNotFound
from tests.broker_spec.conftest import Backend, wait_until, waiting


def run_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


Make = Callable[..., RedisClient]


@pytest.fixture
def make(redis_url: str) -> Iterator[Make]:
    made: list[RedisClient] = []

    def make_client(run: str | None = None, **options: Any) -> RedisClient:
        client = RedisClient(redis_url, run_id=run or run_id(), session_ttl=1.5, **options)
        made.append(client)
        return client

    yield make_client
    for client in made:
        client.close()
    for run in {client.run_id for client in made}:
        with RedisClient(redis_url, run_id=run) as janitor:
            janitor.purge()


def test_client_with_a_redis_url_is_the_redis_client(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_RUN_ID", run_id())
    client: Any
    with Client(redis_url) as client:
        assert isinstance(client, RedisClient)
        client.set("k", 1, ttl=60)
        assert client.get("k") == 1
        client.purge()
    assert isinstance(AsyncClient(redis_url), AsyncRedisClient)
    assert isinstance(Client(path=redis_url, timeout=2.0), RedisClient)


def test_corral_broker_url_takes_precedence_over_ephemeral_pipe(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("EPHEMERAL_PIPE", "/nonexistent/broker.sock")
    monkeypatch.setenv("CORRAL_BROKER_URL", redis_url)
    monkeypatch.setenv("CORRAL_RUN_ID", run_id())
    client: Any = Client()
    assert isinstance(client, RedisClient)
    assert client.url == redis_url
    client.close()
    monkeypatch.delenv("CORRAL_BROKER_URL")
    socket_client: Any = Client()
    assert type(socket_client) is Client  # back to the socket broker


def test_configuration_errors_are_clear(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_RUN_ID", raising=False)
    with pytest.raises(ValueError, match="CORRAL_RUN_ID"):
        RedisClient(redis_url)
    with pytest.raises(ValueError, match="run id"):
        RedisClient(redis_url, run_id="bad{id}")
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisClient("http://example.com", run_id="r")
    with pytest.raises(ValueError, match="session_ttl"):
        RedisClient(redis_url, run_id="r", session_ttl=0)


# redis-py before 5.1 leaves the socket of a failed Unix-socket connect unclosed (its
# ResourceWarning, raised when garbage collected, is not corral's).
_LEAKS_FAILED_SOCKETS = release(installed("redis") or "0") < release("5.1")


@pytest.mark.filterwarnings(
    ("ignore" if _LEAKS_FAILED_SOCKETS else "error") + "::pytest.PytestUnraisableExceptionWarning"
)
def test_unreachable_redis_is_broker_unavailable() -> None:
    client = RedisClient("unix:///nonexistent/redis.sock", run_id="r", timeout=0.5)
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):
        client.get("k")
    with pytest.raises(BrokerUnavailable):
        client.ping()
    client.close()
    with pytest.raises(BrokerUnavailable, match="closed"):
        client.get("k")


def test_password_never_shows(redis_url: str) -> None:
    client = RedisClient("redis://user:s3cret@127.0.0.1:1/0", run_id="r", timeout=0.2)
    assert "s3cret" not in repr(client)
    with pytest.raises(BrokerUnavailable) as exc:
        client.ping()
    assert "s3cret" not in str(exc.value)
    client.close()


def test_runs_are_isolated_by_prefix(make: Make) -> None:
    a1 = make("run-a")
    a2 = make("run-a")
    b = make("run-b")
    a1.set("k", "a", ttl=60)
    b.set("k", "b", ttl=60)
    assert a2.get("k") == "a"
    assert b.get("k") == "b"
    with a1.lock("l", timeout=0), b.lock("l", timeout=0):
        pass  # same lock name, different runs: no contention
    raw = a1._r.keys("corral:{run-a}:*")
    assert raw
    assert all(str(key).startswith("corral:{run-a}:") for key in raw)
    assert a1.purge() >= 1
    assert a2.get("k", None) is None
    assert b.get("k") == "b"


def test_scripts_are_reloaded_after_a_script_flush(make: Make) -> None:
    client = make()
    client.set("k", 1, ttl=60)
    client._r.script_flush()  # e.g. Redis restarted or failed over
    client.set("k", 2, ttl=60)
    assert client.get("k") == 2


def test_expired_keys_answer_expired_not_not_found(make: Make) -> None:
    client = make()
    client.set("k", 1, ttl=0.05)
    time.sleep(0.15)
    with pytest.raises(KeyNotFound) as exc:
        client.get("k")
    assert exc.value.expired
    assert client.keys() == []


def test_clean_close_frees_at_once_and_status_shows_who(make: Make) -> None:
    run = run_id()
    holder, observer = make(run, worker_id="gw3"), make(run)
    ctx = holder.lock("l")
    ctx.__enter__()
    status = observer.status()
    (entry,) = status["holders"]
    assert entry["who"]["pid"] == os.getpid()
    assert entry["who"]["worker"] == "gw3"
    assert entry["ttl_left"] is None
    assert len(status["sessions"]) == 1  # observer only reads: it needs no session
    holder.close()
    with observer.lock("l", timeout=0):
        pass
    assert observer.stats()["sessions"] == 1


def test_a_paused_holder_loses_its_lock_and_learns_it(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec_run = run_id()
    env = {"CORRAL_BROKER_URL": redis_url, "CORRAL_RUN_ID": spec_run, "CORRAL_SESSION_TTL": "1.0"}
    backend = Backend("redis", env, lambda: RedisClient(redis_url, run_id=spec_run), lambda: None)
    try:
        holder = backend.spawn("pause_holder", "l")
        assert holder.stdout is not None
        held = holder.stdout.readline()
        os.kill(holder.pid, signal.SIGSTOP)  # a debugger, a suspended VM, a long GC pause
        observer = backend.client()
        with observer.lock("l", timeout=10) as token:
            assert f'"token": {token - 1}' in held
        os.kill(holder.pid, signal.SIGCONT)
        report = holder.stdout.readline()
        assert "was freed before release" in report
        assert holder.wait(10) == 0
    finally:
        backend.close()
        with RedisClient(redis_url, run_id=spec_run) as janitor:
            janitor.purge()


def test_session_lost_in_process_is_replaced(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    run = run_id()
    a, b = make(run), make(run)
    assert a.lease("slots", "w", ttl=60) == 0
    assert b.lease("other", "b", ttl=60) == 0  # b's heartbeat reaps dead sessions
    first = a._session.sid
    a._session._stop.set()  # a's heartbeat stops, as if the process froze
    wait_until(lambda: b.stats()["sessions"] == 1, 10, "the frozen session to be reaped")
    assert b.stats()["leases"] == 1  # a's lease went with its session
    with caplog.at_level(logging.WARNING, logger="corral.broker.redis"):
        assert a.lease("slots", "w", ttl=60) == 0  # it carries on as a new session
    assert a._session.sid != first
    assert "expired" in caplog.text
    time.sleep(2.0)  # longer than session_ttl: the new session's heartbeat keeps it alive
    assert b.stats()["sessions"] == 2


def test_the_socket_clients_arguments_work_when_the_env_selects_redis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Code written for the socket broker (Client(spin=0), AsyncClient(compress_threshold=...))
    # must not break with TypeError when CORRAL_BROKER_URL turns it into a Redis run.
    monkeypatch.setenv("CORRAL_BROKER_URL", redis_url)
    monkeypatch.setenv("CORRAL_RUN_ID", run_id())
    values: dict[str, Any] = {"secret": None, "timeout": 2.0, "compress_threshold": 100, "spin": 0}
    for socket_cls, redis_cls in ((Client, RedisClient), (AsyncClient, AsyncRedisClient)):
        params = inspect.signature(socket_cls.__init__).parameters
        named: dict[str, Any] = {
            name: values[name] for name in params if name not in ("self", "path")
        }
        client: Any = socket_cls(**named)
        assert isinstance(client, redis_cls)
        assert client.timeout == 2.0
        if isinstance(client, RedisClient):
            with client:
                client.set("k", 1, ttl=60)
                assert client.get("k") == 1
                client.purge()
        assert set(named) <= set(inspect.signature(redis_cls.__init__).parameters)
        # A subclass of a socket client stays a socket client (it needs a socket path).
        monkeypatch.delenv("EPHEMERAL_PIPE", raising=False)
        with pytest.raises(BrokerUnavailable, match="EPHEMERAL_PIPE"):
            type("Sub", (socket_cls,), {})()


def test_redis_client_mirrors_the_socket_client_signatures() -> None:
    for name, member in inspect.getmembers(Client, inspect.isfunction):
        if name.startswith("_"):
            continue
        ours = getattr(RedisClient, name)
        assert list(inspect.signature(member).parameters) == list(
            inspect.signature(ours).parameters
        ), name


def test_a_starved_waiter_queues_again_under_a_new_session(make: Make) -> None:
    run = run_id()
    holder, waiter, observer = make(run), make(run), make(run)
    observer.lease("reaper", "observer", ttl=60)  # a live session whose heartbeat reaps
    got: list[int] = []

    def wait() -> None:
        with waiter.lock("l", timeout=30) as token:
            got.append(token)

    with holder.lock("l") as first_token:
        thread = threading.Thread(target=wait)
        thread.start()
        wait_until(lambda: waiting(observer, "lock", "l") == 1, 5, "the waiter to queue")
        first = waiter._session.sid
        waiter._session._stop.set()  # its heartbeat starves: the session expires
        wait_until(
            lambda: waiter._session.sid != first and waiting(observer, "lock", "l") == 1,
            10,
            "the waiter to queue again under a new session",
        )
    thread.join(10)
    assert got == [first_token + 1]


def test_a_forked_child_gets_its_own_session(make: Make) -> None:
    import warnings

    client = make()
    with client.lock("parent"):
        parent_sid = client._session.sid
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            code = 1
            try:
                with client.lock("child", timeout=5):
                    holders = client.status()["holders"]
                    mine = [h for h in holders if h["name"] == "child"]
                    ok = mine[0]["who"]["pid"] == os.getpid() and client._session.sid != parent_sid
                    os.write(write, b"ok" if ok else b"bad")
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        answer = os.read(read, 16)
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert answer == b"ok"
    assert os.WEXITSTATUS(status) == 0
    assert client._session.sid == parent_sid  # the parent's session is untouched


def test_closing_during_a_wait_registers_no_new_session(make: Make) -> None:
    run = run_id()
    holder, waiter = make(run), make(run)
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
    assert [type(e) for e in errors] == [BrokerUnavailable]
    time.sleep(1.0)  # longer than a heartbeat interval
    assert holder.stats()["sessions"] == 1
    assert waiter._session._thread is None  # no heartbeat revived for the closed client
