"""The broker's wire protocol, sans-IO: NDJSON framing, value codec, message HMAC, auth proofs.

Nothing here touches a socket, a clock or a thread: the asyncio server and both clients
feed bytes in and take bytes (or events) out, exactly like h11.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import json.encoder
import json.scanner
import re
import zlib
from collections.abc import Callable
from typing import Any, Final

from corral.broker.messages import (
    CLOSED,
    NEED_DATA,
    Message,
    Rejected,
    Request,
    Response,
    TooLarge,
)
from corral.errors import ProtocolError

__all__ = [
    "COMPRESS_THRESHOLD",
    "ClientConnection",
    "OutOfRange",
    "ServerConnection",
    "auth_proof",
    "decode_value",
    "dumps",
    "encode_value",
    "message_hmac",
    "out_of_range_detail",
    "sign_message",
    "verify_message_hmac",
]

#: Node's client compresses values whose JSON is at least this many characters.
COMPRESS_THRESHOLD: Final = 1024


def _not_json(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class OutOfRange(ValueError):
    """A number the broker could not send back: NaN, Infinity, or a float beyond 1.8e308."""


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; JSON (and Node) do not.
    raise OutOfRange(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # Called by the C scanner only for numbers with a fraction or an exponent, so a
    # request without floats (a GET) never pays for it. 1e400 would become inf, which
    # json refuses to write back: refuse it here, where the sender can be told.
    number = float(text)
    if number - number != 0.0:  # inf - inf is nan; cheaper than math.isfinite's lookup
        raise OutOfRange(f"{text} is out of range for a 64-bit float")
    return number


class _Marker:
    """Stands in for the first out-of-range number while its path is looked for."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _path_of(value: Any, marker: _Marker, path: str) -> str | None:
    if value is marker:
        return path
    if type(value) is dict:
        for key, item in value.items():
            step = f".{key}" if key.isidentifier() else f"[{json.dumps(key)}]"
            if not path and key.isidentifier():
                step = key
            found = _path_of(item, marker, path + step)
            if found is not None:
                return found
    elif type(value) is list:
        for index, item in enumerate(value):
            found = _path_of(item, marker, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def out_of_range_detail(text: str) -> str:
    """Where the first out-of-range number of the JSON *text* is, for an error detail:
    ``number out of range at value.a[2]: 1e400`` (only run for a refused line)."""
    markers: list[_Marker] = []

    def mark(token: str) -> Any:
        number = float(token)  # also reads NaN, Infinity, -Infinity
        if number - number == 0.0 or markers:
            return number
        markers.append(_Marker(token))
        return markers[0]

    try:
        obj = json.loads(text, parse_float=mark, parse_constant=mark)
    except (ValueError, RecursionError):  # bad JSON after the number, or too deep
        obj = None
    if not markers:
        return "number out of range"
    path = _path_of(obj, markers[0], "")
    where = f" at {path[:200]}" if path else ""
    token = markers[0].text
    if len(token) > 40:
        token = f"{token[:20]}...{token[-10:]} ({len(token)} characters)"
    return f"number out of range{where}: {token} (JSON numbers must be finite doubles)"


def _compact_encoder() -> Callable[[Any], str]:
    """Compact, ASCII-only JSON text of a value, refusing NaN and infinities.

    With CPython's C accelerator, its encoder built once: ``json.dumps`` and
    ``JSONEncoder.encode`` build it again on every call, which costs more than encoding a
    small answer. It is an undocumented internal (None on PyPy and some builds), so
    without it the public encoder does the same work, with the same text and errors.
    No circular-reference markers: parsed values cannot be circular, and a circular user
    value ends in RecursionError, mapped to TypeError by :func:`dumps`.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(
            separators=(",", ":"), allow_nan=False, check_circular=False, default=_not_json
        ).encode
    c_encode = make(
        None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )

    def encode(obj: Any) -> str:
        return "".join(c_encode(obj, 0))

    return encode


_encode = _compact_encoder()
_js_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _json_scanner() -> Callable[[str, int], tuple[Any, int]]:
    """``scan(text, index) -> (value, end)``, StopIteration where no value starts.

    Finite numbers only. json's C scanner, built once, when there is one: it is what
    ``JSONDecoder.raw_decode`` calls, minus that method's Python frame (a sixth of the
    time to read a small request), but an undocumented internal (None on PyPy and some
    builds); without it, the same through the documented ``raw_decode``.
    """
    decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
    make = getattr(json.scanner, "c_make_scanner", None)
    if make is not None:
        return make(decoder)  # type: ignore[no-any-return]

    def scan(text: str, index: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            if exc.pos == index and exc.msg == "Expecting value":
                raise StopIteration(index) from None  # as the scanner says it
            raise

    return scan


_scan = _json_scanner()
_JSON_SPACE = " \t\n\r"
_SPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")


def dumps(obj: Any) -> bytes:
    """Serialise *obj* as one compact protocol line, newline included.

    :raises TypeError: *obj* holds something JSON cannot represent (NaN, sets, objects,
        circular references), before anything is sent.
    """
    try:
        text = _encode(obj)
    except (ValueError, RecursionError) as exc:  # NaN / infinity / circular reference
        raise TypeError(f"value is not JSON-serialisable: {exc}") from exc
    return text.encode() + b"\n"


def _loads(data: bytes) -> Any:
    text = data.decode("utf-8")
    try:
        obj, end = _scan(text, 0)
    except StopIteration:  # leading whitespace, or no JSON value at all
        stripped = text.lstrip(_JSON_SPACE)
        if stripped == text:
            raise ValueError("expecting a JSON value at column 0") from None
        return _loads(stripped.encode())
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise ValueError(f"extra data after the JSON value at column {end}")
    return obj


class ServerConnection:
    """Server side of one connection: bytes in, :class:`Request` events out, bytes back.

    Lines over *max_request_size* bytes produce :class:`TooLarge`, after which the
    connection is finished (the server answers and closes). Blank lines are ignored.
    """

    __slots__ = ("_buf", "_closed", "_done", "_scan", "max_request_size")

    def __init__(self, max_request_size: int = 1024 * 1024) -> None:
        self.max_request_size = max_request_size
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no newline
        self._closed = False  # peer sent EOF
        self._done = False  # a TooLarge was emitted: no more events

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer (copied); ``b""`` means the peer closed its side."""
        if data:
            if not self._done:
                self._buf += data
        else:
            self._closed = True

    def next_event(self) -> Request | Rejected | TooLarge | object:
        """Return the next event, :data:`NEED_DATA`, or :data:`CLOSED`."""
        buf = self._buf
        while not self._done:
            idx = buf.find(b"\n", self._scan)
            if idx < 0:
                if len(buf) > self.max_request_size:
                    return self._too_large(len(buf))
                self._scan = len(buf)
                break
            line = bytes(buf[:idx])
            del buf[: idx + 1]
            self._scan = 0
            if len(line) > self.max_request_size:
                return self._too_large(len(line))
            if not line or (line[0] in _SPACE_BYTES and not line.strip()):
                continue
            try:
                obj = _loads(line)
            except OutOfRange:
                return Rejected("invalid_value", out_of_range_detail(line.decode()))
            except (ValueError, UnicodeDecodeError) as exc:
                return Rejected("invalid_json", f"not JSON: {exc}")
            if type(obj) is not dict:
                return Rejected("invalid_json", "a request must be a JSON object")
            return Request(obj, line)
        if self._closed or self._done:
            return CLOSED
        return NEED_DATA

    @property
    def has_buffered(self) -> bool:
        """True when received bytes wait to be turned into events."""
        return bool(self._buf) or self._closed

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def _too_large(self, size: int) -> TooLarge:
        self._done = True
        self._buf.clear()
        return TooLarge(size, self.max_request_size)

    @staticmethod
    def send(response: Message) -> bytes:
        """Serialise one response line."""
        return _encode(response).encode() + b"\n"


class ClientConnection:
    """Client side of one connection: requests to bytes, bytes to :class:`Response` events."""

    __slots__ = ("_buf", "_closed", "_scan", "max_response_size")

    def __init__(self, max_response_size: int = 64 * 1024 * 1024) -> None:
        self.max_response_size = max_response_size
        self._buf = bytearray()
        self._scan = 0
        self._closed = False

    @staticmethod
    def send(request: Message) -> bytes:
        """Serialise one request line.

        :raises TypeError: the request holds a value JSON cannot represent.
        """
        return dumps(request)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the broker (copied); ``b""`` means it closed the connection."""
        if data:
            self._buf += data
        else:
            self._closed = True

    def next_event(self) -> Response | object:
        """Return the next :class:`Response`, :data:`NEED_DATA` or :data:`CLOSED`.

        :raises ProtocolError: the broker sent something that is not a JSON object line.
        """
        buf = self._buf
        idx = buf.find(b"\n", self._scan)
        if idx < 0:
            if len(buf) > self.max_response_size:
                raise ProtocolError(f"response line over {self.max_response_size} bytes")
            self._scan = len(buf)
            return CLOSED if self._closed else NEED_DATA
        line = bytes(buf[:idx])
        del buf[: idx + 1]
        self._scan = 0
        try:
            obj = _loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"the broker sent a line that is not JSON: {line[:80]!r}") from exc
        if type(obj) is not dict:
            raise ProtocolError(f"the broker sent a non-object line: {line[:80]!r}")
        return Response(obj)

    @property
    def has_buffered(self) -> bool:
        """True when bytes of a later response are already buffered (pipelining)."""
        return bool(self._buf)


# --------------------------------------------------------------------------- values


def encode_value(value: Any, threshold: int | None = COMPRESS_THRESHOLD) -> tuple[Any, bool, int]:
    """Return ``(wire_value, compressed, json_length)`` for storing *value*, Node-compatibly.

    Values whose JSON is at least *threshold* characters are sent as
    ``base64(gzip(JSON))`` when that is shorter (``threshold=None`` never compresses).

    :raises TypeError: *value* is not JSON-serialisable.
    """
    try:
        text = _js_encoder.encode(value)
    except ValueError as exc:
        raise TypeError(f"value is not JSON-serialisable: {exc}") from exc
    if threshold is None or len(text) < threshold:
        return value, False, len(text)
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: Node could not read it compressed
        return value, False, len(text)
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip container, like Node
    packed = base64.b64encode(packer.compress(raw) + packer.flush()).decode("ascii")
    if len(packed) >= len(text):
        return value, False, len(text)
    return packed, True, len(text)


def decode_value(wire_value: Any, compressed: bool) -> Any:
    """Inverse of :func:`encode_value`; reads values compressed by Node clients too.

    :raises ProtocolError: a value flagged ``compressed`` is not base64(gzip(JSON)).
    """
    if not compressed:
        return wire_value
    if not isinstance(wire_value, str):
        raise ProtocolError("a compressed value must be a base64 string")
    try:
        raw = zlib.decompress(base64.b64decode(wire_value, validate=True), 47)
        return _loads(raw)
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise ProtocolError(f"cannot decompress value: {exc}") from exc


# --------------------------------------------------------------------------- auth

# ``,"hmac":"<64 hex>"}`` at the very end of a line, as the Node client writes it.
_TRAILING_HMAC = re.compile(rb',\s*"hmac"\s*:\s*"([0-9a-fA-F]{64})"\s*\}\s*\Z')


def message_hmac(secret: bytes, payload: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of *payload*, as the Node client computes it."""
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def sign_message(secret: bytes, request: Message) -> bytes:
    """Serialise *request* the way the Node client does, with its ``hmac`` member last."""
    body = _js_encoder.encode(request)
    mac = message_hmac(secret, body.encode())
    return (body[:-1] + f',"hmac":"{mac}"}}').encode() + b"\n"


def verify_message_hmac(secret: bytes, raw: bytes, obj: Message) -> bool:
    """Check a Node-style per-message ``hmac`` over the bytes received.

    The Node client signs ``JSON.stringify(payload)`` and sends it with ``,"hmac":...``
    inserted before the final brace, so stripping that member from the received line
    gives back exactly the signed bytes; re-serialising the parsed object (what the
    original broker does) breaks on any other JSON spelling. Lines with ``hmac``
    elsewhere are checked against the JavaScript serialisation of the rest.
    """
    claimed = obj.get("hmac")
    if not isinstance(claimed, str) or len(claimed) != 64:
        return False
    match = _TRAILING_HMAC.search(raw)
    if match is not None:
        payload = raw[: match.start()].rstrip() + b"}"
    else:
        rest = {k: v for k, v in obj.items() if k != "hmac"}
        try:
            payload = _js_encoder.encode(rest).encode()
        except ValueError:
            return False
    return hmac.compare_digest(message_hmac(secret, payload), claimed.lower())


def auth_proof(secret: bytes, role: str, nonce: str, cnonce: str) -> str:
    """The challenge-response proof for *role* (``"client"`` or ``"server"``).

    Both nonces are bound in, and the role too, so a proof cannot be replayed on another
    connection nor reflected back by a fake broker.
    """
    message = f"corral-auth-v1\n{role}\n{nonce}\n{cnonce}".encode()
    return message_hmac(secret, message)
