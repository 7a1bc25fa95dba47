"""The sans-IO protocol in memory: framing, limits, value codec, message HMAC, purity."""

from __future__ import annotations

import ast
import base64
import gzip
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker import protocol
from corral.broker.messages import CLOSED, NEED_DATA, Rejected, Request, Response, TooLarge
from corral.broker.protocol import (
    ClientConnection,
    ServerConnection,
    decode_value,
    dumps,
    encode_value,
    sign_message,
    verify_message_hmac,
)
from corral.errors import ProtocolError

BROKER_SRC = Path(protocol.__file__).parent


def events(conn: ServerConnection) -> list[Any]:
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)


def test_pure_modules_import_no_io() -> None:
    """protocol, messages, the store and _core never import socket/asyncio/threading/time."""
    forbidden = {"socket", "asyncio", "threading", "time", "selectors", "subprocess"}
    pure = ("protocol.py", "messages.py", "_store.py", "_coord.py", "_holds.py", "_ticket.py")
    for name in (*pure, "_core.py"):
        tree = ast.parse((BROKER_SRC / name).read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
                if node.module.startswith("corral."):
                    assert node.module in {
                        "corral.broker.messages",
                        "corral.broker.protocol",
                        "corral.broker._store",
                        "corral.broker._coord",
                        "corral.broker._holds",
                        "corral.broker._ticket",
                        "corral.errors",
                    }, (name, node.module)
        assert not imported & forbidden, (name, imported & forbidden)


def test_one_request_per_line_in_order() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"action":"ping"}\n{"action":"get","key":"a"}\n\n  \n{"action":"list"}')
    got = events(conn)
    assert [e.obj["action"] for e in got if isinstance(e, Request)] == ["ping", "get"]
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"\n")
    (last,) = events(conn)
    assert isinstance(last, Request)
    assert last.raw == b'{"action":"list"}'


def test_bytes_one_at_a_time() -> None:
    data = b'{"action":"set","key":"k\\u00e9","value":[1,{"a":null}]}\n{"action":"ping"}\n'
    conn = ServerConnection()
    got = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        got += events(conn)
    assert [e.obj for e in got] == [
        {"action": "set", "key": "k\u00e9", "value": [1, {"a": None}]},
        {"action": "ping"},
    ]


def test_cut_mid_frame_then_closed() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"action":"ping"}\n{"action":"ge')
    assert len(events(conn)) == 1
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED  # the half line is dropped, never parsed


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[1,2,3]", "JSON object"),
        (b'"just a string"', "JSON object"),
        (b'{"action":"ping"', "not JSON"),
    ],
)
def test_invalid_lines_are_rejected_and_the_connection_goes_on(line: bytes, detail: str) -> None:
    conn = ServerConnection()
    conn.receive_data(line + b'\n{"action":"ping"}\n')
    rejected, ok = events(conn)
    assert isinstance(rejected, Rejected)
    assert rejected.code == "invalid_json"
    assert detail in rejected.detail
    assert isinstance(ok, Request)


def test_over_limit_line_without_newline_ends_the_connection() -> None:
    conn = ServerConnection(max_request_size=100)
    conn.receive_data(b"x" * 60)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"x" * 60)
    event = conn.next_event()
    assert isinstance(event, TooLarge)
    assert (event.size, event.limit) == (120, 100)
    conn.receive_data(b'{"action":"ping"}\n')
    assert conn.next_event() is CLOSED  # nothing after too_large is processed


def test_over_limit_line_with_newline() -> None:
    conn = ServerConnection(max_request_size=10)
    conn.receive_data(b'{"a":"0123456789"}\n')
    assert isinstance(conn.next_event(), TooLarge)


def test_line_exactly_at_limit_is_fine() -> None:
    line = b'{"action":"ping"}'
    conn = ServerConnection(max_request_size=len(line))
    conn.receive_data(line + b"\n")
    assert isinstance(conn.next_event(), Request)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_random_bytes_never_raise(data: bytes, chunk: int) -> None:
    conn = ServerConnection(max_request_size=200)
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i : i + chunk])
        for event in events(conn):
            assert isinstance(event, Request | Rejected | TooLarge)
    conn.receive_data(b"")
    events(conn)
    assert conn.next_event() is CLOSED


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=3), max_size=5), st.data()
)
def test_any_split_gives_the_same_requests(
    objs: list[dict[str, object]], data: st.DataObject
) -> None:
    stream = b"".join(dumps(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    conn = ServerConnection()
    got = []
    start = 0
    for cut in [*cuts, len(stream)]:
        conn.receive_data(stream[start:cut])
        start = cut
        got += events(conn)
    assert [e.obj for e in got if isinstance(e, Request)] == objs


def test_client_connection_parses_responses_and_flags_garbage() -> None:
    conn = ClientConnection()
    conn.receive_data(b'{"ok":true,"pong":1}\n{"ok":fa')
    event = conn.next_event()
    assert isinstance(event, Response)
    assert event.obj == {"ok": True, "pong": 1}
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"lse}\nnot json\n")
    assert conn.next_event() == Response({"ok": False})
    with pytest.raises(ProtocolError, match="not JSON"):
        conn.next_event()
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


def test_dumps_refuses_non_json_before_sending() -> None:
    with pytest.raises(TypeError):
        dumps({"value": {1, 2}})
    with pytest.raises(TypeError, match="JSON"):
        dumps({"value": float("nan")})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TypeError):
        dumps({"value": loop})


# ---------------------------------------------------------------------- values


def node_compress(value: object) -> str:
    """What the Node client does: base64(gzip(JSON.stringify(value)))."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(gzip.compress(text.encode())).decode()


def test_small_values_are_sent_as_they_are() -> None:
    assert encode_value({"a": 1}) == ({"a": 1}, False, 7)


def test_large_values_are_compressed_like_node() -> None:
    value = {"rows": ["same text again"] * 200}
    wire, compressed, size = encode_value(value)
    assert compressed
    assert size == len(json.dumps(value, separators=(",", ":")))
    # What Node's decompressValue does: gunzip(base64) then JSON.parse.
    assert json.loads(gzip.decompress(base64.b64decode(wire))) == value
    assert decode_value(wire, True) == value


def test_node_compressed_values_are_read() -> None:
    value = {"é": "ü" * 3000, "n": [1, 2.5, None]}
    assert decode_value(node_compress(value), True) == value


def test_incompressible_values_stay_plain() -> None:
    import os

    noise = base64.b64encode(os.urandom(3000)).decode()
    assert encode_value(noise) == (noise, False, len(noise) + 2)


def test_broken_compressed_value_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_value("not base64 gzip!", True)
    with pytest.raises(ProtocolError):
        decode_value(12, True)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_values_round_trip_through_the_codec(value: object) -> None:
    wire, compressed, _ = encode_value(value, threshold=1)
    assert decode_value(json.loads(json.dumps(wire)), compressed) == value


# ---------------------------------------------------------------------- hmac

SECRET = b"s3cret"


def node_signed_line(payload: dict[str, object], secret: bytes = SECRET) -> bytes:
    """The Node client's bytes: JSON.stringify({...payload, hmac})."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    mac = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    return json.dumps({**payload, "hmac": mac}, separators=(",", ":"), ensure_ascii=False).encode()


def test_node_style_hmac_verifies_over_the_received_bytes() -> None:
    raw = node_signed_line({"action": "set", "key": "k", "value": "é", "ttl": 1000})
    assert verify_message_hmac(SECRET, raw, json.loads(raw))
    assert not verify_message_hmac(b"other", raw, json.loads(raw))


def test_hmac_over_bytes_survives_other_json_spellings() -> None:
    # \u00e9 escapes: re-serialising the parsed object (the original broker) would fail.
    body = b'{"action":"set","key":"caf\\u00e9","value":1.50}'
    mac = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    raw = body[:-1] + f',"hmac":"{mac}"}}'.encode()
    assert verify_message_hmac(SECRET, raw, json.loads(raw))


def test_tampered_or_missing_hmac_fails() -> None:
    raw = node_signed_line({"action": "get", "key": "a"})
    tampered = raw.replace(b'"a"', b'"b"')
    assert not verify_message_hmac(SECRET, tampered, json.loads(tampered))
    assert not verify_message_hmac(SECRET, b'{"action":"get"}', {"action": "get"})
    assert not verify_message_hmac(SECRET, b'{"hmac":5}', {"hmac": 5})


def test_hmac_not_last_is_checked_against_the_js_serialisation() -> None:
    payload = {"action": "get", "key": "a"}
    mac = hmac.new(SECRET, b'{"action":"get","key":"a"}', hashlib.sha256).hexdigest()
    raw = json.dumps({"hmac": mac, **payload}).encode()
    assert verify_message_hmac(SECRET, raw, json.loads(raw))


def test_sign_message_matches_node() -> None:
    payload = {"action": "set", "key": "k", "value": {"x": "ü"}, "ttl": 5}
    assert sign_message(SECRET, payload) == node_signed_line(payload) + b"\n"


def test_deep_nesting_is_rejected_not_a_crash() -> None:
    conn = ServerConnection()
    conn.receive_data(b"[" * 100_000 + b"\n" + b'{"action":"ping"}\n')
    rejected, ok = events(conn)
    assert isinstance(rejected, Rejected)
    assert "deep" in rejected.detail
    assert isinstance(ok, Request)


# What the codec makes of awkward input, as comparable text: run here (with json's C
# accelerator) and in a child without it (as on PyPy), the two must agree.
_CODEC_CORPUS = r"""
import json
from corral.broker.protocol import ServerConnection, dumps

def describe(event):
    return [type(event).__name__, *(str(v) for v in vars(event).values())] if hasattr(
        event, "__dict__") else [type(event).__name__, repr(event)]

lines = [
    b'{"action":"set","key":"k","value":{"a":[1,2.5,-0.0,1e-7,12345678901234567890],"b":null}}',
    b'  {"action":"ping"}', b'\t\r{"x":true}  ', b'{"s":"\\u00e9\\ud83d\\ude00 \\"q\\" \\\\"}',
    b'not json', b'\xff\xfe', b'[1,2]', b'"str"', b'{"a":1', b'{"a":1} x', b'{"a":NaN}',
    b'{"a":[1,{"b":1e400}]}', b'{"a":-Infinity}', b'{"a":01}', b'{"a":1,}', b'{}',
    b'[' * 5000, b'{"a":"\x01"}', b'{"\xc3\xa9":1}',
]
out = []
for line in lines:
    conn = ServerConnection()
    conn.receive_data(line + b"\n")
    event = conn.next_event()
    out.append(["line", type(event).__name__, repr(getattr(event, "obj", None)),
                getattr(event, "code", None), getattr(event, "detail", None)])
loop = []
loop.append(loop)
values = [{"a": "\u00e9\U0001f600", "b": [1.5, 1e300, -0.0, True, None, 10**30]}, "s", 3,
          {1: "int key", 2.5: "float key", None: "n", True: "t"}, {"v": float("nan")},
          {"v": float("inf")}, {"v": {1, 2}}, {"v": loop}, {"v": object()}, {(1,): 2}]
for value in values:
    try:
        out.append(["dumps", dumps(value).decode()])
    except Exception as exc:
        out.append(["dumps", type(exc).__name__])
print(json.dumps(out))
"""


def test_without_the_json_accelerator_the_codec_gives_the_same_results() -> None:
    import os
    import subprocess
    import sys

    here = subprocess.run(
        [sys.executable, "-c", _CODEC_CORPUS], capture_output=True, text=True, check=True
    ).stdout
    blocked = "import sys; sys.modules['_json'] = None\n" + _CODEC_CORPUS.replace(
        "import json\n",
        "import json, json.decoder, json.scanner\nassert json.scanner.c_make_scanner is None\n"
        "assert json.encoder.c_make_encoder is None\n",
        1,
    )
    without = subprocess.run(
        [sys.executable, "-c", blocked],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(BROKER_SRC.parent.parent)},
    )
    assert without.returncode == 0, without.stderr

    def comparable(results: list[list[Any]]) -> list[list[Any]]:
        # CPython's C and Python scanners word some of their own messages differently
        # (a control character in a string): compare what corral says, "not JSON".
        return [
            [*r[:4], r[4].split(": ")[0]] if r[0] == "line" and r[3] == "invalid_json" else r
            for r in results
        ]

    assert comparable(json.loads(without.stdout)) == comparable(json.loads(here))
