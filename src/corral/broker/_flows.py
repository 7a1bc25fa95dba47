"""Client operations written once, as generators both clients drive (psycopg's pattern).

A flow yields :class:`~corral.broker.messages.Call` objects and is resumed with the
broker's answer; the blocking and the asyncio client only move the bytes.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from hmac import compare_digest
from typing import Any, Final, TypeVar

from corral.broker.messages import COMPUTE, Call, Compute, Message
from corral.broker.protocol import COMPRESS_THRESHOLD, auth_proof, decode_value, encode_value
from corral.errors import (
    AuthFailed,
    BarrierBroken,
    BrokerError,
    ClaimLost,
    OnceFailed,
    ProtocolError,
    error_from_code,
)

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


def check_seconds(value: object, what: str) -> None:
    """TypeError unless *value* is a number (of seconds; a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")


def check_rate(name: str, rate: float, per: float) -> None:
    """A throttle's arguments (both backends): a name, two positive finite numbers."""
    check_name(name, "throttle name")
    for label, number in (("rate", rate), ("per", per)):
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise TypeError(f"{label} must be a number, got {type(number).__name__}")
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{label} must be a positive number, got {number!r}")


def check_timeout(timeout: float | None) -> float | None:
    """A wait's timeout in seconds (None: forever), validated before anything is sent.

    :raises TypeError: not a number. :raises ValueError: negative or NaN.
    """
    if timeout is None:
        return None
    check_seconds(timeout, "timeout")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return float(timeout)


def _ttl_ms(ttl: float | None) -> int | float | None:
    if ttl is None:
        return None
    check_seconds(ttl, "ttl")
    ms = ttl * 1000
    if math.isfinite(ms) and ms == int(ms):
        return int(ms)
    return ms


def check_name(key: str, what: str = "key") -> str:
    """The key or name of a request: a non-empty str (TypeError / ValueError before sending)."""
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{what} must not be empty")
    return key


# ---------------------------------------------------------------------- handshake


def hello(secret: bytes | None) -> Flow[Handshake]:
    """Introduce the connection; with a secret, answer the broker's challenge."""
    request: Message = {"action": "hello", "client": _CLIENT_NAME, "pid": os.getpid()}
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        request["worker"] = worker
    request["host"] = os.uname().nodename
    response = yield Call(request)
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
    response = yield Call({"action": "get", "key": check_name(key)}, key=key)
    missing = response.get("ok") is not True and response.get("error") in ("not_found", "expired")
    if missing and default is not MISSING:
        return default
    check(response, key)
    return decode_value(response.get("value"), response.get("compressed") is True)


def set_(
    key: str, value: Any, ttl: float | None, threshold: int | None = COMPRESS_THRESHOLD
) -> Flow[None]:
    request: Message = {"action": "set", "key": check_name(key)}
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
    response = check((yield Call({"action": "del", "key": check_name(key)}, key=key)), key)
    return bool(response.get("deleted", True))


def keys() -> Flow[list[str]]:
    items = check((yield Call({"action": "list"}))).get("items")
    if not isinstance(items, dict):
        raise ProtocolError("list answered without items")
    return list(items)


def lease(key: str, worker_id: str, ttl: float | None) -> Flow[int]:
    check_name(key)
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


# ---------------------------------------------------------------------- coordination


def _timeout_ms(timeout: float | None) -> int | float | None:
    """A wait's timeout on the wire; None waits forever, 0 does not wait."""
    seconds = check_timeout(timeout)
    if seconds is None or math.isinf(seconds):
        return None
    return _ttl_ms(seconds)


def _waiting(request: Message, timeout: float | None, key: str) -> Call:
    ms = _timeout_ms(timeout)
    if ms is not None:
        request["timeout"] = ms
    return Call(request, timeout=None if ms is None else ms / 1000, key=key, wait=True)


def _with_ttl(request: Message, ttl: float | None) -> Message:
    ms = _ttl_ms(ttl)
    if ms is not None:
        request["ttl"] = ms
    return request


def _coordination_error(response: Message, key: str | None) -> None:
    """Raise the richer errors of coordination answers (original message, reason)."""
    code = response.get("error")
    if code == "once_failed":
        message, etype = str(response.get("message", "")), str(response.get("errorType", ""))
        raise OnceFailed(
            f"once_failed: computing {key!r} raised {etype}: {message}",
            key=key,
            original=message,
            error_type=etype,
        )
    if code == "barrier_broken":
        reason = str(response.get("reason", ""))
        raise BarrierBroken(
            f"barrier_broken: barrier {key!r} is broken: {reason}", key=key, reason=reason
        )
    check(response, key)


def _ok(response: Message, key: str | None) -> Message:
    if response.get("ok") is not True:
        _coordination_error(response, key)
    return response


def add(key: str, value: Any, ttl: float | None, threshold: int | None) -> Flow[bool]:
    request = _with_ttl({"action": "add", "key": check_name(key)}, ttl)
    wire, compressed, _ = encode_value(value, threshold)
    request["value"] = wire
    if compressed:
        request["compressed"] = True
    return bool(_ok((yield Call(request, key=key)), key).get("added"))


def incr(key: str, amount: int, ttl: float | None) -> Flow[int]:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int, got {type(amount).__name__}")
    request = _with_ttl({"action": "incr", "key": check_name(key), "amount": amount}, ttl)
    value = _ok((yield Call(request, key=key)), key).get("value")
    if type(value) is not int:
        raise ProtocolError(f"incr answered a non-integer {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Claim:
    """This caller must compute the value of ``once(key)``: it holds the claim."""

    key: str


def once_begin(key: str, timeout: float | None) -> Flow[Any]:
    """The stored value, or a :class:`Claim` when this caller must compute it."""
    response = _ok((yield _waiting({"action": "once", "key": check_name(key)}, timeout, key)), key)
    if response.get("status") == "compute":
        return Claim(key)
    return decode_value(response.get("value"), response.get("compressed") is True)


def once(
    key: str, ttl: float | None, timeout: float | None, threshold: int | None
) -> Generator[Call | Compute, Any, Any]:
    """``once(key, compute)`` as one flow: the stored value, or this caller computes it.

    Yields :data:`~corral.broker.messages.COMPUTE` when this caller holds the claim; the
    driver calls ``compute()`` and resumes the flow with its result or throws its error
    in. A failure is reported to every other caller (``once_fail``), an interruption
    (Ctrl-C, task cancellation) hands the claim to a waiter (``once_cancel``); either way
    the caller gets its own exception.
    """
    begun = yield from once_begin(key, timeout)
    if not isinstance(begun, Claim):
        return begun
    try:
        value = yield COMPUTE
        return (yield from once_done(begun, value, ttl, threshold))
    except GeneratorExit:
        raise
    except Exception as exc:  # compute raised, or its result is not JSON, or too large
        # The original error matters more than a failure to report it (the claim then
        # dies with the connection, and a waiter is elected).
        with contextlib.suppress(BrokerError):
            yield from once_fail(begun, exc, ttl)
        raise
    except BaseException:  # Ctrl-C / cancellation is not a failure of compute
        with contextlib.suppress(BrokerError):
            yield from once_cancel(begun)
        raise


def once_done(claim: Claim, value: Any, ttl: float | None, threshold: int | None) -> Flow[Any]:
    """Store the computed value; returns the value every caller sees."""
    wire, compressed, _ = encode_value(value, threshold)  # TypeError before sending
    request = _with_ttl({"action": "once_done", "key": claim.key, "value": wire}, ttl)
    if compressed:
        request["compressed"] = True
    response = _ok((yield Call(request, key=claim.key, wakes=True)), claim.key)
    if response.get("status") == "done":  # a replacement computer stored first
        return decode_value(response.get("value"), response.get("compressed") is True)
    return value


def once_fail(claim: Claim, exc: BaseException, ttl: float | None) -> Flow[None]:
    request = {
        "action": "once_fail",
        "key": claim.key,
        "message": str(exc) or repr(exc),
        "errorType": type(exc).__name__,
    }
    _ok((yield Call(_with_ttl(request, ttl), key=claim.key, wakes=True)), claim.key)


def once_cancel(claim: Claim) -> Flow[None]:
    _ok((yield Call({"action": "once_cancel", "key": claim.key}, key=claim.key)), claim.key)


@dataclass(frozen=True, slots=True)
class Grant:
    """A lock or pool item this client holds: what giving it back needs."""

    kind: str
    name: str
    token: int
    item: int
    value: Any


def take(kind: str, name: str, ttl: float | None, timeout: float | None) -> Flow[Grant]:
    """Take lock *name* (``kind="lock"``) or an item of pool *name*, waiting FIFO."""
    check_name(name, f"{kind} name")
    if ttl is not None and not (_ttl_ms(ttl) or 0) > 0:  # TypeError for a non-number
        raise error_from_code("invalid_ttl", key=name, detail=f"a {kind} ttl must be > 0")
    action = "lock" if kind == "lock" else "acquire"
    request = _with_ttl({"action": action, "name": name}, ttl)
    response = _ok((yield _waiting(request, timeout, name)), name)
    token, item = response.get("token"), response.get("item")
    if type(token) is not int or type(item) is not int:
        raise ProtocolError(f"{action} answered without a token: {response!r}")
    return Grant(kind, name, token, item, response.get("value"))


def give_back(grant: Grant) -> Flow[bool]:
    """Free a lock/pool item; False when it was no longer held (its TTL passed)."""
    action = "unlock" if grant.kind == "lock" else "release_item"
    request = {"action": action, "name": grant.name, "token": grant.token}
    answer = _ok((yield Call(request, key=grant.name, wakes=True)), grant.name)
    return bool(answer.get("released"))


def claim_lost(grant: Grant) -> ClaimLost:
    """The error for a lock/pool item that was freed before its holder released it."""
    exc = error_from_code(
        "claim_lost",
        key=grant.name,
        detail=f"{grant.kind} {grant.name!r} (token {grant.token}) was freed before release: "
        "its ttl passed or this client's connection was lost; another holder may have run "
        "meanwhile",
    )
    assert isinstance(exc, ClaimLost)
    return exc


def pool(name: str, items: Sequence[Any]) -> Flow[bool]:
    check_name(name, "pool name")
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise TypeError("items must be a list of JSON values")
    if not items:
        raise ValueError(f"pool {name!r} needs at least one item")
    values = [encode_value(item, None)[0] for item in items]  # TypeError before sending
    request = {"action": "pool", "name": name, "items": values}
    return bool(_ok((yield Call(request, key=name)), name).get("created"))


def throttle(name: str, rate: float, per: float, timeout: float | None) -> Flow[None]:
    """Wait until the run-wide rate of *rate* calls per *per* seconds allows a call."""
    check_rate(name, rate, per)
    if float(rate).is_integer():
        calls, window = int(rate), float(per)
    else:  # a fractional rate: one call per per/rate seconds
        calls, window = 1, per / rate
    request: Message = {"action": "throttle", "name": name, "calls": calls, "per": window * 1000}
    _ok((yield _waiting(request, timeout, name)), name)


def barrier(name: str, parties: int, timeout: float | None) -> Flow[int]:
    check_name(name, "barrier name")
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ValueError(f"parties must be a positive int, got {parties!r}")
    request: Message = {"action": "barrier", "name": name, "parties": parties}
    index = _ok((yield _waiting(request, timeout, name)), name).get("index")
    if type(index) is not int:
        raise ProtocolError(f"barrier answered without an index: {index!r}")
    return index


def push(queue: str, items: tuple[Any, ...]) -> Flow[int]:
    check_name(queue, "queue name")
    if not items:
        raise ValueError("push needs at least one item")
    values = [encode_value(item, None)[0] for item in items]  # TypeError before sending
    request = {"action": "push", "queue": queue, "items": values}
    length = _ok((yield Call(request, key=queue, wakes=True)), queue).get("length")
    if type(length) is not int:
        raise ProtocolError(f"push answered without a length: {length!r}")
    return length


def pop(queue: str, timeout: float | None) -> Flow[Any]:
    check_name(queue, "queue name")
    request: Message = {"action": "pop", "queue": queue}
    return _ok((yield _waiting(request, timeout, queue)), queue).get("value")


def status() -> Flow[dict[str, Any]]:
    response = check((yield Call({"action": "status"})))
    return {k: v for k, v in response.items() if k != "ok"}
