"""Start-up never waits without a bound: the lazily started broker."""

from __future__ import annotations

import os

import pytest

from corral._plugin._lazybroker import LazyBroker
from corral.broker import Client


def _running(lazy: LazyBroker) -> bool:
    return lazy.running  # (a call: mypy narrows the property to False for good otherwise)


def test_lazy_broker_starts_at_the_first_connection_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EPHEMERAL_PIPE", raising=False)
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
    assert "EPHEMERAL_PIPE" not in os.environ
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
