"""Hostile bytes against a live broker, kept as a test (issue 16, "keep the attacks").

Each example sends malformed requests (bad UTF-8, wrong types for every field of every
action, huge and deep values, NaN/Infinity/1e400, duplicate keys, pipelined garbage,
partial writes) on one connection, reads every answer until the broker closes it, and
checks that each answer is a well-formed ``{"ok": ...}`` object and never
``internal_error``; then a fresh client's well-formed requests must succeed.

Bounded to a few seconds by default; ``CORRAL_FUZZ_EXAMPLES=5000`` for a long run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.broker import Broker
from corral.broker._core import _HANDLERS
from tests.broker._raw import Raw

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded machine must not turn slowness into a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=EXAMPLES <= 100,  # the short run is the same every time
)
# pytest-timeout's 120 s is per test; a long run gets up to a second per example.
LONG_ENOUGH = pytest.mark.timeout(max(120, EXAMPLES))

# What each action's fields look like when well-formed (the fuzz breaks them).
FIELDS: dict[str, dict[str, Any]] = {
    "get": {"key": "k"},
    "set": {"key": "k", "value": 1, "ttl": 1000, "compressed": False},
    "del": {"key": "k"},
    "lease": {"key": "k", "workerId": "w", "ttl": 1000},
    "release": {"workerId": "w"},
    "hello": {"pid": 1, "client": "fuzz", "worker": "gw0", "host": "h"},
    "auth": {"cnonce": "c" * 16, "proof": "p"},
    "add": {"key": "k", "value": 1, "ttl": 1000},
    "incr": {"key": "n", "amount": 1, "ttl": 1000},
    "once": {"key": "o", "timeout": 0},
    "once_done": {"key": "o", "value": 1, "ttl": 1000},
    "once_fail": {"key": "o", "message": "m", "errorType": "E", "ttl": 1000},
    "once_cancel": {"key": "o"},
    "lock": {"name": "l", "ttl": 1000, "timeout": 0},
    "unlock": {"name": "l", "token": 1},
    "pool": {"name": "p", "items": [1, 2]},
    "acquire": {"name": "p", "ttl": 1000, "timeout": 0},
    "release_item": {"name": "p", "token": 1},
    "throttle": {"name": "t", "calls": 1, "per": 10, "timeout": 0},
    "barrier": {"name": "b", "parties": 2, "timeout": 0},
    "push": {"queue": "q", "items": [1]},
    "pop": {"queue": "q", "timeout": 0},
}
ACTIONS = sorted(_HANDLERS)
# Raw JSON tokens the encoder would never write: spliced into otherwise valid lines.
SPECIAL = [
    b"1e400",
    b"-1e400",
    b"1E999",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e-400",
    b"-0",
    b"9" * 4300,  # the longest integer Python reads
    b"9" * 4301,  # one digit over
    b"[" * 2000 + b"]" * 2000,  # deeper than the decoder goes
    b"[" * 400 + b"]" * 400,  # deep, yet readable back in a deep test stack
]
_PLACEHOLDER = "\x00special\x00"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """One request line for a real action, with fields broken in every way."""
    unknown = draw(st.integers(0, 9)) == 0
    action = draw(st.text(max_size=8) if unknown else st.sampled_from(ACTIONS))
    obj: dict[str, Any] = {"action": action}
    specials: list[bytes] = []
    for field, good in FIELDS.get(action, {}).items():
        how = draw(st.sampled_from(["good"] * 5 + ["absent", "wrong", "wrong", "special"]))
        if how == "good":
            obj[field] = good
        elif how == "wrong":
            obj[field] = draw(json_values)
        elif how == "special":
            obj[field] = _PLACEHOLDER
            specials.append(draw(st.sampled_from(SPECIAL)))
    if draw(st.booleans()):
        obj.update(draw(st.dictionaries(st.sampled_from(["ttl", "key", "x"]), json_values)))
    line = json.dumps(obj).encode()
    for token in specials:
        line = line.replace(json.dumps(_PLACEHOLDER).encode(), token, 1)
    if draw(st.integers(0, 9)) == 0:  # duplicate keys: the last one wins in Python
        line = line[:-1] + b',"action":' + json.dumps(draw(st.sampled_from(ACTIONS))).encode()
        line += b"}"
    return line


@st.composite
def poisoned(draw: st.DrawFn) -> bytes:
    """A well-formed request whose value hides a number JSON cannot carry back."""
    action = draw(st.sampled_from(["set", "add", "once_done", "push", "pool", "incr"]))
    obj = {"action": action, **FIELDS[action]}
    field = {"push": "items", "pool": "items", "incr": "amount"}.get(action, "value")
    holder = draw(st.sampled_from([_PLACEHOLDER, [_PLACEHOLDER], {"a": [1, _PLACEHOLDER]}]))
    obj[field] = [holder] if field == "items" else holder
    token = draw(st.sampled_from(SPECIAL))
    return json.dumps(obj).encode().replace(json.dumps(_PLACEHOLDER).encode(), token)


garbage = st.one_of(
    st.binary(max_size=60),  # bad UTF-8, NUL bytes, stray newlines
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[]",
            b'"str"',
            b"null",
            b'{"action":}',
            b'{"action":"get","key":"\xff\xfe"}',
            b'{"action":"get","key":"\\ud800"}',
            b"\xef\xbb\xbf{}",
            b"   ",
        ]
    ),
    st.integers(1, 12).map(lambda n: b'{"action":"set","key":"d","value":' + b"[" * (n * 200)),
)


@st.composite
def conversations(draw: st.DrawFn) -> list[bytes]:
    """Pipelined lines, cut into chunks at random points (partial writes)."""
    lines = draw(st.lists(requests() | poisoned() | garbage, min_size=1, max_size=6))
    data = b"\n".join(lines) + draw(st.sampled_from([b"\n", b"", b"\n\n"]))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    chunks, start = [], 0
    for cut in cuts:
        chunks.append(data[start:cut])
        start = cut
    chunks.append(data[start:])
    return [c for c in chunks if c]


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Broker]:
    broker = Broker(require_ttl=False, max_request_size=64 * 1024, max_value_size=32 * 1024)
    broker.start()
    with Raw(broker.path) as r:
        assert r.ask({"action": "set", "key": "canary", "value": {"alive": True}})["ok"]
    yield broker
    broker.stop()


@contextlib.contextmanager
def _headroom() -> Iterator[None]:
    """Room to parse deep answers: Hypothesis runs the test a few hundred frames deep."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _answers(raw: Raw) -> list[dict[str, Any]]:
    """Every answer until the broker closes the connection (we closed our side)."""
    raw.sock.settimeout(10)
    data = b""
    while True:
        try:
            chunk = raw.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    answers = []
    for line in data.split(b"\n"):
        if line:
            with _headroom():
                answer = json.loads(line)
            assert type(answer) is dict, line[:200]
            answers.append(answer)
    return answers


# Well-formed requests that read whatever the fuzz may have stored: a value the broker
# took but cannot send back shows up here as internal_error.
PROBES: list[dict[str, Any]] = [
    *({"action": "get", "key": key} for key in ("k", "n", "o", "d", "h")),
    {"action": "incr", "key": "n", "amount": 0},
    {"action": "pop", "queue": "q", "timeout": 0},
    {"action": "once", "key": "o", "timeout": 0},
    {"action": "list"},
    {"action": "stats"},
    {"action": "health"},
    {"action": "metrics"},
    {"action": "status"},
]


def _still_serves(broker: Broker) -> None:
    with Raw(broker.path) as r:
        assert r.ask({"action": "ping"})["ok"] is True
        assert r.ask({"action": "get", "key": "canary"})["value"] == {"alive": True}
        assert r.ask({"action": "set", "key": "canary", "value": {"alive": True}})["ok"]
        for probe in PROBES:
            with _headroom():
                answer = r.ask(probe)
            assert answer.get("error") != "internal_error", (probe, answer)
            if answer.get("status") == "compute":  # we hold the claim now: give it up
                assert r.ask({"action": "once_cancel", "key": "o"})["ok"]


@LONG_ENOUGH
@FUZZ
@given(chunks=conversations())
def test_malformed_requests_never_hurt_the_broker(fuzzed: Broker, chunks: list[bytes]) -> None:
    raw = Raw(fuzzed.path)
    try:
        try:
            for chunk in chunks:
                raw.sock.sendall(chunk)
            raw.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # too_large closes the connection: fine
        for answer in _answers(raw):
            assert answer.get("ok") in (True, False), answer
            if answer["ok"] is False:
                assert type(answer.get("error")) is str, answer
                assert answer["error"] != "internal_error", (chunks, answer)
    finally:
        raw.close()
    _still_serves(fuzzed)


@LONG_ENOUGH
@FUZZ
@given(size=st.integers(64 * 1024, 300 * 1024), cut=st.integers(1, 4096))
def test_an_oversized_line_is_refused_and_the_broker_goes_on(
    fuzzed: Broker, size: int, cut: int
) -> None:
    line = b'{"action":"set","key":"h","value":"' + b"x" * size + b'"}\n'
    raw = Raw(fuzzed.path)
    try:
        try:
            raw.sock.sendall(line[:cut])
            raw.sock.sendall(line[cut:])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answers = _answers(raw)
        assert [a.get("error") for a in answers] in ([], ["too_large"])
    finally:
        raw.close()
    _still_serves(fuzzed)
