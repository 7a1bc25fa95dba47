"""What both Redis clients share: configuration, error mapping, reports (no I/O here).

redis-py's exceptions become corral's in :func:`mapped`, the one place they are mapped.
"""

from __future__ import annotations

import logging
import os
import time
from itertools import count
from typing import Any, TypeVar

from corral.broker.redis import _flows as flows
from corral.broker.redis._session import prefix_for, resolve_run_id, resolve_url, session_info
from corral.errors import (
    AuthFailed,
    BrokerError,
    BrokerRequestError,
    BrokerTimeout,
    BrokerUnavailable,
    ClaimLost,
    error_from_code,
)

log = logging.getLogger("corral.broker.redis")
T = TypeVar("T")

#: Seconds a killed or frozen client keeps its claims (``$CORRAL_SESSION_TTL`` overrides).
DEFAULT_SESSION_TTL = 5.0


def import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - redis is a dev dependency
        raise ImportError("the Redis backend needs redis-py: pip install 'corral[redis]'") from exc
    return redis


def mapped(exc: Exception, url: str) -> BrokerError:
    """The corral error for a redis-py exception (the one place they are mapped)."""
    import redis.exceptions as rex

    where = redact(url)
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return AuthFailed(f"auth_failed: Redis at {where} refused the credentials: {exc}")
    if isinstance(exc, rex.TimeoutError):
        return BrokerTimeout(f"no answer from Redis at {where} in time: {exc}")
    if isinstance(exc, rex.ConnectionError):
        return BrokerUnavailable(
            f"cannot reach Redis at {where}: {exc}. Is it running, and is the URL right?"
        )
    if isinstance(exc, rex.ResponseError):
        return BrokerRequestError(f"Redis at {where} refused: {exc}", code="redis_error")
    return BrokerError(f"Redis at {where} failed: {exc}")


def redact(url: str) -> str:
    """*url* without its password, for messages and reprs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


class RedisBase:
    """Configuration shared by both clients (no I/O here)."""

    def __init__(
        self,
        url: str | None,
        secret: str | bytes | None,
        timeout: float,
        run_id: str | None,
        session_ttl: float | None,
        default_ttl: float,
        worker_id: str | None,
    ) -> None:
        if session_ttl is None:
            session_ttl = float(os.environ.get("CORRAL_SESSION_TTL") or DEFAULT_SESSION_TTL)
        self.url = resolve_url(url)
        self.run_id = resolve_run_id(run_id)
        self.prefix = prefix_for(self.run_id)
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if not session_ttl > 0:
            raise ValueError(f"session_ttl must be positive, got {session_ttl!r}")
        if not default_ttl > 0:
            raise ValueError(f"default_ttl must be positive, got {default_ttl!r}")
        self.timeout = float(timeout)
        self.session_ttl = float(session_ttl)
        self.default_ttl = float(default_ttl)
        self._default_ms = flows.ttl_ms(default_ttl, 0)
        self._password = secret.decode() if isinstance(secret, bytes) else secret
        self.worker_id = worker_id
        self._tickets = count()
        self._closed = False

    def _options(self, blocking: bool) -> dict[str, Any]:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": self.timeout,
            # A blocking pop waits up to WAIT_SLICE seconds inside Redis.
            "socket_timeout": self.timeout + (flows.WAIT_SLICE if blocking else 0.0),
        }
        if not self.url.startswith("unix://"):  # a partition must not hang a wait forever
            options["socket_keepalive"] = True
        if self._password is not None:
            options["password"] = self._password  # the URL's own password wins
        return options

    def _tid(self, sid: str) -> str:
        return f"{sid}.{os.getpid()}.{next(self._tickets)}"

    def _session_args(self, sid: str, mode: str) -> list[Any]:
        # Who registers is read now, not at __init__: a forked child is its own pid.
        info = session_info(self.worker_id) if mode == "register" else ""
        return [sid, flows.ttl_ms(self.session_ttl, 0), mode, info]

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {redact(self.url)} run={self.run_id!r} {state}>"


def lost(grant: flows.Grant) -> ClaimLost:
    exc = error_from_code(
        "claim_lost",
        key=grant.name,
        detail=f"{grant.kind} {grant.name!r} (token {grant.token}) was freed before release: "
        "its ttl passed or this client's session expired; another holder may have run meanwhile",
    )
    assert isinstance(exc, ClaimLost)
    return exc


def health(info: dict[str, Any], latency: float) -> dict[str, Any]:
    return {
        "status": "healthy",
        "backend": "redis",
        "redisVersion": info.get("redis_version"),
        "uptime": int(info.get("uptime_in_seconds", 0)) * 1000,
        "timestamp": int(time.time() * 1000),
        "latencyMs": latency,
    }


def metrics(stats: dict[str, Any], run_id: str) -> str:
    label = f'{{run="{run_id}"}}'
    lines = []
    for name, help_ in (
        ("items", "Live keys of the run"),
        ("leases", "Leases held"),
        ("sessions", "Live client sessions"),
        ("holders", "Locks and pool items held"),
        ("waiters", "Clients waiting for a lock, pool item, once value or barrier"),
    ):
        metric = f"corral_broker_{name}"
        lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge"]
        lines.append(f"{metric}{label} {stats[name]}")
    return "\n".join(lines) + "\n"
