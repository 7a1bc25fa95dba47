"""Where the broker is and how long to wait for it: the socket path and secret from the
environment, the error for an unreachable broker, each request's answer timeout.

Shared by the blocking and the asyncio client.
"""

from __future__ import annotations

import os

from corral.broker.messages import Call
from corral.errors import BrokerUnavailable

__all__ = ["resolve_path", "resolve_secret", "timeout_for", "unavailable"]


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


def timeout_for(call: Call, default: float) -> float | None:
    """Seconds to wait for *call*'s answer; None: until the broker answers.

    A waiting call (``call.wait``) is ended by the broker, which answers ``timeout``
    itself; the client allows its own timeout on top for the answer to arrive.
    """
    if call.wait:
        return None if call.timeout is None else call.timeout + default
    return default if call.timeout is None else call.timeout
