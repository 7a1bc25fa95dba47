"""Client operations written once, as generators both clients drive (psycopg's pattern).

A flow yields :class:`~corral.broker.messages.Call` objects and is resumed with the
broker's answer; the blocking and the asyncio client only move the bytes.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from hmac import compare_digest
from typing import Any, Final, TypeVar

from corral.broker.messages import Call, Message
from corral.broker.protocol import COMPRESS_THRESHOLD, auth_proof, decode_value, encode_value
from corral.errors import AuthFailed, ProtocolError, error_from_code

T = TypeVar("T")
Flow = Generator[Call, Message, T]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Default for ``get(key, default)``: no default, raise :class:`~corral.errors.KeyNotFound`.
MISSING: Final[Any] = _Missing()

_CLIENT_NAME: Final = f"corral-py/{sys.version_info[0]}.{sys.version_info[1]}"


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a connection learned when it said hello.

    :ivar legacy: the peer is the Node broker (no ``hello``): requests are signed per
        message instead and nothing is owned by the connection.
    """

    legacy: bool
    instance: str | None = None
    session: int | None = None


def check(response: Message, key: str | None = None) -> Message:
    """Return an ``ok`` response, raise the mapped exception for an error answer."""
    if response.get("ok") is True:
        return response
    code = response.get("error")
    if type(code) is not str:
        raise ProtocolError(f"the broker answered neither ok nor an error code: {response!r}")
    detail = response.get("detail")
    raise error_from_code(code, key=key, detail=detail if type(detail) is str else None)


def _ttl_ms(ttl: float | None) -> int | float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
    ms = ttl * 1000
    if math.isfinite(ms) and ms == int(ms):
        return int(ms)
    return ms


def _check_key(key: str, what: str = "key") -> str:
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{what} must not be empty")
    return key


# ---------------------------------------------------------------------- handshake


def hello(secret: bytes | None) -> Flow[Handshake]:
    """Introduce the connection; with a secret, answer the broker's challenge."""
    response = yield Call({"action": "hello", "client": _CLIENT_NAME, "pid": os.getpid()})
    if response.get("ok") is not True:
        code = response.get("error")
        if code == "unknown_action" or (code == "auth_failed" and secret is not None):
            # The Node broker: no hello (and with a secret it wants every request signed).
            return Handshake(legacy=True)
        check(response)
    if response.get("auth") == "challenge":
        if secret is None:
            raise AuthFailed(
                "auth_failed: the broker requires a secret; set EPHEMERAL_SECRET or pass secret=",
                code="auth_failed",
            )
        nonce = response.get("nonce")
        if type(nonce) is not str:
            raise ProtocolError("the broker's challenge carries no nonce")
        cnonce = secrets.token_hex(16)
        proof = auth_proof(secret, "client", nonce, cnonce)
        answer = check((yield Call({"action": "auth", "cnonce": cnonce, "proof": proof})))
        expected = auth_proof(secret, "server", nonce, cnonce)
        if not compare_digest(str(answer.get("proof")), expected):
            raise AuthFailed(
                "auth_failed: the broker could not prove it knows the secret", code="auth_failed"
            )
    instance = response.get("instance")
    session = response.get("session")
    return Handshake(
        legacy=False,
        instance=instance if type(instance) is str else None,
        session=session if type(session) is int else None,
    )


# ---------------------------------------------------------------------- operations


def ping() -> Flow[float]:
    started = time.perf_counter()
    check((yield Call({"action": "ping"})))
    return (time.perf_counter() - started) * 1000.0


def get(key: str, default: Any = MISSING) -> Flow[Any]:
    response = yield Call({"action": "get", "key": _check_key(key)}, key=key)
    missing = response.get("ok") is not True and response.get("error") in ("not_found", "expired")
    if missing and default is not MISSING:
        return default
    check(response, key)
    return decode_value(response.get("value"), response.get("compressed") is True)


def set_(
    key: str, value: Any, ttl: float | None, threshold: int | None = COMPRESS_THRESHOLD
) -> Flow[None]:
    request: Message = {"action": "set", "key": _check_key(key)}
    # Serialising here raises TypeError for non-JSON values before anything is sent.
    wire, compressed, size = encode_value(value, threshold)
    request["value"] = wire
    ms = _ttl_ms(ttl)
    if ms is not None:
        request["ttl"] = ms
    if compressed:  # the Node client's fields; the broker only counts them in metrics
        request["compressed"] = True
        request["beforeSize"] = size
        request["afterSize"] = len(wire)
    check((yield Call(request, key=key)), key)


def delete(key: str) -> Flow[bool]:
    response = check((yield Call({"action": "del", "key": _check_key(key)}, key=key)), key)
    return bool(response.get("deleted", True))


def keys() -> Flow[list[str]]:
    items = check((yield Call({"action": "list"}))).get("items")
    if not isinstance(items, dict):
        raise ProtocolError("list answered without items")
    return list(items)


def lease(key: str, worker_id: str, ttl: float | None) -> Flow[int]:
    _check_key(key)
    if not isinstance(worker_id, str | int) or isinstance(worker_id, bool):  # type: ignore[unreachable,unused-ignore]
        raise TypeError(f"worker_id must be a str, got {type(worker_id).__name__}")
    request: Message = {"action": "lease", "key": key, "workerId": worker_id}
    ms = _ttl_ms(ttl)
    if ms is not None:
        request["ttl"] = ms
    value = check((yield Call(request, key=key)), key).get("value")
    if type(value) is not int:
        raise ProtocolError(f"lease answered a non-integer value {value!r}")
    return value


def release(worker_id: str) -> Flow[bool]:
    if not isinstance(worker_id, str | int) or isinstance(worker_id, bool):  # type: ignore[unreachable,unused-ignore]
        raise TypeError(f"worker_id must be a str, got {type(worker_id).__name__}")
    response = check((yield Call({"action": "release", "workerId": worker_id})))
    return bool(response.get("released"))


def stats() -> Flow[dict[str, Any]]:
    result = check((yield Call({"action": "stats"}))).get("stats")
    if not isinstance(result, dict):
        raise ProtocolError("stats answered without stats")
    return result


def health() -> Flow[dict[str, Any]]:
    response = check((yield Call({"action": "health"})))
    return {k: v for k, v in response.items() if k != "ok"}


def metrics() -> Flow[str]:
    text = check((yield Call({"action": "metrics"}))).get("metrics")
    if not isinstance(text, str):
        raise ProtocolError("metrics answered without text")
    return text
