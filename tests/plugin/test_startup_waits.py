"""Start-up never waits without a bound: the pre-clone hand-over, the lazily started broker."""

from __future__ import annotations

import os

import pytest

from corral._plugin import _database
from corral._plugin._database import WorkerDatabase
from corral._plugin._lazybroker import LazyBroker
from corral._plugin._run import RunInfo
from corral.broker import Broker, Client
from corral.errors import CorralError


def test_a_stuck_preclone_handover_is_an_error_not_a_hang(
    broker: Broker, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The controller (another pid) claimed the name and holds its lock: its clone hangs.
    info = RunInfo(
        run_id="r1",
        controller_pid=os.getpid() + 1,
        broker_path=broker.path,
        admin_dsn="postgresql://nowhere/postgres",
        template="t",
    )
    database = WorkerDatabase(info, client, "gw0@1")
    database.name = info.clone_name(1)
    lock, claim, _ = _database._handover_keys(database.name, info.controller_pid)
    monkeypatch.setattr(_database, "HANDOVER_TIMEOUT", 0.2)
    with Client(broker.path) as controller:
        assert controller.add(claim, "controller", ttl=60)
        expected = pytest.raises(CorralError, match="creating this process's database corral_r1_1 ")
        with controller.lock(lock), expected:
            database._take_precloned()


def _running(lazy: LazyBroker) -> bool:
    return lazy.running  # (a call: mypy narrows the property to False for good otherwise)


def test_lazy_broker_starts_at_the_first_connection_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EPHEMERAL_PIPE", "/a/broker/that/does/not/answer.sock")
    lazy = LazyBroker(require_ttl=False)
    path = lazy.start()
    try:
        assert os.environ["EPHEMERAL_PIPE"] == path
        assert os.path.exists(path)
        assert not _running(lazy)
        assert lazy.holdings() == []
        with Client(path) as client:
            client.set("k", 1)
            assert client.get("k") == 1
            assert _running(lazy)
            with client.lock("held"):
                assert [h["key"] for h in lazy.holdings()] == ["held"]
    finally:
        lazy.stop()
    assert not os.path.exists(path)
    assert os.environ["EPHEMERAL_PIPE"] == "/a/broker/that/does/not/answer.sock"
    lazy.stop()  # idempotent


def test_lazy_broker_never_used_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPHEMERAL_PIPE", "/somewhere/else.sock")
    lazy = LazyBroker(require_ttl=False)
    path = lazy.start()
    lazy.stop()
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.dirname(path))
    assert os.environ["EPHEMERAL_PIPE"] == "/somewhere/else.sock"
    assert lazy.broker is None
