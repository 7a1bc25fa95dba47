"""Where the broker is and how long to wait for it: the socket path and secret from the
environment, the error for an unreachable broker, each request's answer timeout, and
whether an address means the Redis backend (without importing it).

Shared by the blocking and the asyncio client.
"""

from __future__ import annotations

import errno
import os
from typing import Final

from corral.broker.messages import Call
from corral.errors import BrokerTimeout, BrokerUnavailable

__all__ = [
    "busy",
    "is_busy",
    "is_redis_url",
    "next_delay",
    "resolve_path",
    "resolve_secret",
    "timeout_for",
    "unavailable",
    "wants_redis",
]

REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")


def is_redis_url(value: object) -> bool:
    """True when *value* is a URL the Redis backend serves (``redis://``, ``rediss://``,
    ``unix://``)."""
    return isinstance(value, str) and value.startswith(REDIS_SCHEMES)


def wants_redis(path: object) -> bool:
    """Whether ``Client(path)`` means the Redis backend: *path* is a Redis URL, or no path
    was given and ``$CORRAL_BROKER_URL`` is set (it takes precedence over EPHEMERAL_PIPE)."""
    if path is None:
        return bool(os.environ.get("CORRAL_BROKER_URL"))
    return is_redis_url(path)


def resolve_path(path: str | os.PathLike[str] | None) -> str:
    """*path*, else ``$EPHEMERAL_PIPE``.

    :raises BrokerUnavailable: neither is set.
    """
    if path is not None:
        return os.fspath(path)
    env = os.environ.get("EPHEMERAL_PIPE")
    if not env:
        raise BrokerUnavailable(
            "no broker path: pass path= or set EPHEMERAL_PIPE "
            "(run your command under `corral run -- CMD`, or start a Broker)"
        )
    return env


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """*secret*, else ``$EPHEMERAL_SECRET``, as bytes (None when neither is set)."""
    if secret is None:
        secret = os.environ.get("EPHEMERAL_SECRET") or None
    if isinstance(secret, str):
        return secret.encode()
    return secret


def unavailable(path: str, exc: BaseException) -> BrokerUnavailable:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return BrokerUnavailable(
        f"cannot reach the broker at {path}: {reason}. Is it running? "
        "(`corral run -- CMD` starts one and sets EPHEMERAL_PIPE)"
    )


def is_busy(exc: OSError) -> bool:
    """Did ``connect()`` fail because the broker's listen backlog is full?

    A Unix socket answers EAGAIN then, at once, even to a blocking connect with a
    timeout; the broker is alive and busy, so the client retries until its timeout.
    """
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def next_delay(delay: float) -> float:
    """The pause before the next connect attempt to a busy broker: 1 ms doubling to 50 ms."""
    return min(delay * 2, 0.05)


def busy(path: str, timeout: float) -> BrokerTimeout:
    return BrokerTimeout(
        f"the broker at {path} is busy: its listen backlog stayed full for {timeout:g} s "
        "(too many processes connecting at once, or the broker is stuck)"
    )


def timeout_for(call: Call, default: float) -> float | None:
    """Seconds to wait for *call*'s answer; None: until the broker answers.

    A waiting call (``call.wait``) is ended by the broker, which answers ``timeout``
    itself; the client allows its own timeout on top for the answer to arrive.
    """
    if call.wait:
        return None if call.timeout is None else call.timeout + default
    return default if call.timeout is None else call.timeout
