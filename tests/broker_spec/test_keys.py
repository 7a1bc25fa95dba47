"""Keys with TTLs and leases behave the same on every backend."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from corral.errors import InvalidTTL, KeyNotFound, LeaseError
from tests.broker_spec.conftest import Backend, needs, wait_until

VALUES: list[Any] = [
    None,
    True,
    0,
    -7,
    2**53,
    1.5,
    "",
    "héllo \u2603",
    [],
    {},
    [1, "two", {"three": [3.0, None]}],
    {"nested": {"deep": [True, False]}, "unicode": "\u00e9"},
]


@needs("get", "set")
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_json_values_round_trip(backend: Backend, value: Any) -> None:
    client = backend.client()
    client.set("v", value, ttl=60)
    assert client.get("v") == value


@needs("get", "set")
def test_missing_key_says_whether_it_expired(backend: Backend) -> None:
    client = backend.client()
    with pytest.raises(KeyNotFound) as never:
        client.get("never-set")
    assert not never.value.expired
    assert isinstance(never.value, KeyError)
    client.set("short", 1, ttl=0.05)
    time.sleep(0.15)
    with pytest.raises(KeyNotFound) as expired:
        client.get("short")
    assert expired.value.expired
    assert client.get("short", "fallback") == "fallback"
    assert client.get("never-set", None) is None


@needs("set")
@pytest.mark.parametrize("bad", [{1, 2}, b"bytes", object(), math.nan, math.inf])
def test_non_json_values_raise_type_error_before_sending(backend: Backend, bad: Any) -> None:
    client = backend.client()
    with pytest.raises(TypeError):
        client.set("bad", bad, ttl=60)
    stored = client.keys()
    assert "bad" not in stored


@needs("set")
def test_invalid_ttl(backend: Backend) -> None:
    client = backend.client()
    with pytest.raises(InvalidTTL):
        client.set("k", 1, ttl=-1)


@needs("get", "set", "delete", "keys")
def test_delete_and_keys(backend: Backend) -> None:
    client = backend.client()
    client.set("a", 1, ttl=60)
    client.set("b", 2, ttl=60)
    client.set("gone", 3, ttl=0.05)
    time.sleep(0.15)
    assert sorted(client.keys()) == ["a", "b"]
    assert client.delete("a") is True
    assert client.delete("a") is False
    assert client.keys() == ["b"]
    other = backend.client()
    assert other.get("b") == 2  # a second client sees the same run


@needs("lease", "release")
def test_lease_smallest_free_number_and_renewal(backend: Backend) -> None:
    client = backend.client()
    assert client.lease("slots", "w1", ttl=60) == 0
    assert client.lease("slots", "w2", ttl=60) == 1
    assert client.lease("slots", "w1", ttl=60) == 0  # renewal keeps the number
    with pytest.raises(LeaseError):
        client.lease("other", "w1", ttl=60)
    assert client.release("w1") is True
    assert client.release("w1") is False
    assert client.lease("slots", "w3", ttl=60) == 0  # the freed number is reused


@needs("lease", "release")
def test_lease_ttl_passes(backend: Backend) -> None:
    client = backend.client()
    assert client.lease("slots", "w1", ttl=0.05) == 0
    time.sleep(0.15)
    assert client.lease("slots", "w2", ttl=60) == 0


@needs("lease", "release")
def test_lease_is_freed_when_its_client_closes(backend: Backend) -> None:
    holder = backend.client()
    observer = backend.client()
    assert holder.lease("slots", "holder", ttl=600) == 0
    holder.close()

    def number_zero_free() -> bool:
        if observer.lease("slots", "next", ttl=60) == 0:
            return True
        observer.release("next")
        return False

    # At once on a clean close (the socket broker sees the close on its loop's next turn).
    wait_until(number_zero_free, 5, "the freed lease")
