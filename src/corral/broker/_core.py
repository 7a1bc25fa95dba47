"""Request handling, sans-IO: validate a request, authenticate it, run it on the store.

The asyncio server only moves bytes; everything a request *means* is decided here, so
it is tested without sockets and the next operations are one handler each.
"""

from __future__ import annotations

from collections.abc import Callable
from hmac import compare_digest
from typing import Any, Final

from corral.broker._store import Refused, Store, Ticket, Waiter
from corral.broker.messages import Message, Request
from corral.broker.protocol import auth_proof, verify_message_hmac

__all__ = ["PROTOCOL_VERSION", "Core", "Session"]

#: Version of corral's extensions (``hello``/``auth``); the Node protocol has none.
PROTOCOL_VERSION: Final = 1

_OK: Final[Message] = {"ok": True}
# Longest duration taken, in milliseconds: any finite float; an integer beyond has no float.
_MAX_MS: Final = 1e300
_NO_AUTH: Final = frozenset({"hello", "auth"})


class Session:
    """One client connection as the broker sees it; the owner of what it holds.

    A connection becomes *persistent* when it says ``hello`` (corral's clients do);
    only persistent sessions own leases that are freed when they disconnect, because
    one-shot clients (the Node client) close after every request.
    """

    __slots__ = (
        "_who",
        "authenticated",
        "client",
        "connected_at",
        "host",
        "id",
        "nonce",
        "persistent",
        "pid",
        "worker",
    )

    def __init__(self, session_id: int, connected_at: float) -> None:
        self.id = session_id
        self.connected_at = connected_at
        self.persistent = False
        self.authenticated = False
        self.nonce: str | None = None
        self.pid: int | None = None
        self.client: str | None = None
        self.worker: str | None = None
        self.host: str | None = None
        self._who: dict[str, Any] | None = None

    @property
    def owner(self) -> int | None:
        """The store owner key, or None for one-shot connections (TTL-only semantics)."""
        return self.id if self.persistent else None

    def who(self) -> dict[str, Any]:
        """Who this is, for status dumps: session, pid, worker, host, client."""
        if self._who is None:
            self._who = {
                "session": self.id,
                "pid": self.pid,
                "worker": self.worker,
                "host": self.host,
                "client": self.client,
                "persistent": self.persistent,
            }
        return self._who

    def __repr__(self) -> str:
        return f"<Session {self.id} pid={self.pid} client={self.client!r}>"


def _fail(code: str, detail: str = "", extra: dict[str, Any] | None = None) -> Message:
    answer: Message = {"ok": False, "error": code}
    if detail:
        answer["detail"] = detail
    if extra:
        answer.update(extra)
    return answer


def _text(obj: Message, field: str) -> str:
    """A required string field (a key, a lock's, pool's or queue's name)."""
    text = obj.get(field)
    if type(text) is not str or not text:
        raise Refused("bad_request", f"{field!r} must be a non-empty string")
    return text


def _waiter(session: Session, obj: Message) -> Waiter:
    """Who waits and for how long, for a request that may wait: *session*, up to the
    request's ``timeout``."""
    return Waiter(session.owner, session.who(), _seconds(obj, "timeout"))


def _milliseconds(obj: Message, field: str, code: str) -> float | None:
    """A duration field (milliseconds on the wire) in seconds, None when absent.

    The one validation of every duration: a number (not a boolean), finite, >= 0;
    else *code*. (Huge integers are refused too: they have no float.)
    """
    ms: Any = obj.get(field)
    if ms is None:
        return None
    kind = type(ms)
    if kind is int:
        if not 0 <= ms <= _MAX_MS:
            raise Refused(code, f"{field!r} must be milliseconds >= 0, got {_short(ms)}")
        return float(ms) / 1000.0
    if kind is not float or not 0.0 <= ms <= _MAX_MS:  # NaN fails both comparisons
        raise Refused(code, f"{field!r} must be milliseconds >= 0, got {_short(ms)}")
    return float(ms) / 1000.0


def _short(value: Any) -> str:
    text = repr(value) if type(value) is not int or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


def _seconds(obj: Message, field: str) -> float | None:
    """A duration other than ``ttl`` (``timeout``, ``per``): ``bad_request`` if invalid."""
    return _milliseconds(obj, field, "bad_request")


def _hold_ttl(obj: Message) -> float | None:
    """A lock/pool TTL: positive milliseconds, or absent (held until released)."""
    ttl = _ttl_seconds(obj)
    if ttl is not None and not ttl > 0:
        raise Refused("invalid_ttl", f"ttl must be positive, got {obj.get('ttl')!r}")
    return ttl


def _count(obj: Message, field: str, *, minimum: int = 1) -> int:
    value = obj.get(field)
    if type(value) is not int or value < minimum:
        raise Refused("bad_request", f"{field!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _ttl_seconds(obj: Message) -> float | None:
    """The request's ``ttl`` (milliseconds on the wire) in seconds, None when absent.

    Every action's ttl goes through here: ``invalid_ttl`` unless a number >= 0.
    """
    return _milliseconds(obj, "ttl", "invalid_ttl")


class Core:
    """Turns requests into responses against one :class:`Store`.

    :param store: the state.
    :param secret: the shared secret, or None for an open broker.
    :param legacy_hmac: accept Node-style per-message ``hmac`` (replayable; on by
        default for compatibility with the Node clients).
    :param instance: this broker run's random id, so clients notice a restart.
    :param make_nonce: returns a fresh random hex challenge.
    :param facts: returns server facts for ``stats``/``health``: ``uptime_ms``,
        ``connections``, ``rss``, ``in_flight``.
    """

    def __init__(
        self,
        store: Store,
        *,
        secret: bytes | None,
        legacy_hmac: bool,
        instance: str,
        make_nonce: Callable[[], str],
        facts: Callable[[], dict[str, Any]],
    ) -> None:
        self.store = store
        self._secret = secret
        self.legacy_hmac = legacy_hmac
        self.instance = instance
        self._make_nonce = make_nonce
        self._facts = facts
        self.draining = False
        self.requests_total = 0
        self.operations: dict[str, list[int]] = {}
        self.compressed_sets = 0
        self.uncompressed_sets = 0
        self.bytes_before = 0
        self.bytes_after = 0
        self.auth_failures = 0
        #: Open connections by id (maintained by the server), for status dumps.
        self.sessions: dict[int, Session] = {}

    # ------------------------------------------------------------------ entry

    def handle(self, session: Session, request: Request) -> Message | Ticket:
        """Answer one request: a response, or a :class:`Ticket` answered later."""
        obj = request.obj
        self.requests_total += 1
        action = obj.get("action")
        if self.draining:
            return _fail("draining", "the broker is shutting down")
        if (
            self._secret is not None
            and not session.authenticated
            and action not in _NO_AUTH
            and not (self.legacy_hmac and verify_message_hmac(self._secret, request.raw, obj))
        ):
            self.auth_failures += 1
            return _fail("auth_failed", "authenticate (hello/auth) or sign the request (hmac)")
        handler = _HANDLERS.get(action) if isinstance(action, str) else None
        if handler is None or not isinstance(action, str):
            return _fail("unknown_action", f"unknown action {action!r}")
        counts = self.operations.get(action)
        if counts is None:
            counts = self.operations[action] = [0, 0]
        counts[0] += 1
        try:
            return handler(self, session, obj, request.raw)
        except Refused as exc:
            counts[1] += 1
            return _fail(exc.code, exc.detail, exc.extra)

    # ------------------------------------------------------------------ keys

    def _get(self, session: Session, obj: Message, raw: bytes) -> Message:
        entry = self.store.get(_text(obj, "key"))
        return {"ok": True, "value": entry.value, "compressed": entry.compressed}

    def _set(self, session: Session, obj: Message, raw: bytes) -> Message:
        key = _text(obj, "key")
        compressed = obj.get("compressed") is True
        self.store.set(
            key, obj.get("value"), ttl=_ttl_seconds(obj), compressed=compressed, size=len(raw)
        )
        if compressed:
            self.compressed_sets += 1
            before, after = obj.get("beforeSize"), obj.get("afterSize")
            if type(before) is int and type(after) is int:
                self.bytes_before += before
                self.bytes_after += after
        else:
            self.uncompressed_sets += 1
        return _OK

    def _del(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, "deleted": self.store.delete(_text(obj, "key"))}

    def _list(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, "items": self.store.listing()}

    # ------------------------------------------------------------------ leases

    def _lease(self, session: Session, obj: Message, raw: bytes) -> Message:
        key, worker = obj.get("key"), obj.get("workerId")
        if not key or not worker:
            raise Refused("key_and_worker_required", "lease needs 'key' and 'workerId'")
        if type(key) is not str or type(worker) not in (str, int):
            raise Refused("bad_request", "'key' must be a string, 'workerId' a string or integer")
        store = self.store
        value = store.lease(key, worker, _ttl_seconds(obj), session.owner, session.who())
        return {"ok": True, "value": value, "token": store.lease_token(worker)}

    def _release(self, session: Session, obj: Message, raw: bytes) -> Message:
        worker = obj.get("workerId")
        if not worker:
            raise Refused("worker_required", "release needs 'workerId'")
        if type(worker) not in (str, int):
            raise Refused("bad_request", "'workerId' must be a string or integer")
        return {"ok": True, "released": self.store.release(worker)}

    # ------------------------------------------------------------------ counters

    def _add(self, session: Session, obj: Message, raw: bytes) -> Message:
        added = self.store.add(
            _text(obj, "key"),
            obj.get("value"),
            ttl=_ttl_seconds(obj),
            compressed=obj.get("compressed") is True,
            size=len(raw),
        )
        return {"ok": True, "added": added}

    def _incr(self, session: Session, obj: Message, raw: bytes) -> Message:
        amount = obj.get("amount", 1)
        if type(amount) is not int:
            raise Refused("bad_request", f"'amount' must be an integer, got {_short(amount)}")
        return {"ok": True, "value": self.store.incr(_text(obj, "key"), amount, _ttl_seconds(obj))}

    # ------------------------------------------------------------------ coordination

    def _once(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        return self.store.once_begin(_text(obj, "key"), _waiter(session, obj))

    def _once_done(self, session: Session, obj: Message, raw: bytes) -> Message:
        return self.store.once_done(
            _text(obj, "key"),
            obj.get("value"),
            ttl=_ttl_seconds(obj),
            compressed=obj.get("compressed") is True,
            size=len(raw),
        )

    def _once_fail(self, session: Session, obj: Message, raw: bytes) -> Message:
        message, etype = obj.get("message", ""), obj.get("errorType", "")
        if type(message) is not str or type(etype) is not str:
            raise Refused("bad_request", "'message' and 'errorType' must be strings")
        return self.store.once_fail(
            _text(obj, "key"),
            message[:10_000],
            etype[:200],
            ttl=_ttl_seconds(obj),
            owner=session.owner,
        )

    def _once_cancel(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, "cancelled": self.store.once_cancel(_text(obj, "key"), session.owner)}

    def _lock(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        return self._acquire_kind("lock", session, obj)

    def _acquire(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        return self._acquire_kind("pool", session, obj)

    def _acquire_kind(self, kind: str, session: Session, obj: Message) -> Message | Ticket:
        # ttl is checked before timeout (either may be refused): keywords, in that order
        return self.store.acquire(
            kind, _text(obj, "name"), ttl=_hold_ttl(obj), waiter=_waiter(session, obj)
        )

    def _unlock(self, session: Session, obj: Message, raw: bytes) -> Message:
        released = self.store.unhold("lock", _text(obj, "name"), _count(obj, "token"))
        return {"ok": True, "released": released}

    def _release_item(self, session: Session, obj: Message, raw: bytes) -> Message:
        released = self.store.unhold("pool", _text(obj, "name"), _count(obj, "token"))
        return {"ok": True, "released": released}

    def _pool(self, session: Session, obj: Message, raw: bytes) -> Message:
        items = obj.get("items")
        if type(items) is not list:
            raise Refused("bad_request", "'items' must be a list")
        return {"ok": True, "created": self.store.declare_pool(_text(obj, "name"), items)}

    def _throttle(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        per = _seconds(obj, "per")
        if per is None or not per > 0:
            raise Refused("bad_request", "'per' must be a positive number of milliseconds")
        return self.store.throttle(
            _text(obj, "name"), _count(obj, "calls"), per, _waiter(session, obj)
        )

    def _barrier(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        return self.store.barrier(_text(obj, "name"), _count(obj, "parties"), _waiter(session, obj))

    def _push(self, session: Session, obj: Message, raw: bytes) -> Message:
        items = obj.get("items")
        if type(items) is not list:
            raise Refused("bad_request", "'items' must be a list")
        limit = self.store.max_value_size
        if len(raw) > limit * max(1, len(items)):
            raise Refused("too_large", f"items over max_value_size={limit} characters each")
        return {"ok": True, "length": self.store.push(_text(obj, "queue"), items, len(raw))}

    def _pop(self, session: Session, obj: Message, raw: bytes) -> Message | Ticket:
        return self.store.pop(_text(obj, "queue"), _waiter(session, obj))

    def _status(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, **self.status(asking=session)}

    def status(self, asking: Session | None = None) -> dict[str, Any]:
        """Who holds what and who waits for what: ``holders``, ``waiters``, ``sessions``
        (connected clients but the *asking* one) and ``time`` (epoch seconds); entries
        carry ``who``, ``since`` (epoch seconds) and ``ttl_left``/``timeout_left``."""
        store = self.store
        now = store.wall()
        holders, waiters = store.coordination_status()
        for worker, lease in store.leases().items():
            holders.append(
                {
                    "kind": "lease",
                    "name": lease["key"],
                    "item": lease["value"],
                    "worker": worker,
                    "token": lease["token"],
                    "who": lease["who"] or {},
                    "since": lease["since"] / 1000,
                    "ttl_left": max(0.0, lease["expires"] / 1000 - now),
                    "owned": lease["owner"] is not None,
                }
            )
        holders.sort(key=lambda entry: entry["since"])
        waiters.sort(key=lambda entry: entry["since"])
        sessions = [
            dict(s.who(), since=s.connected_at) for s in self.sessions.values() if s.persistent
        ]
        return {"holders": holders, "waiters": waiters, "sessions": sessions, "time": now}

    # ------------------------------------------------------------------ session

    def _hello(self, session: Session, obj: Message, raw: bytes) -> Message:
        session.persistent = True
        pid = obj.get("pid")
        session.pid = pid if type(pid) is int else None
        client = obj.get("client")
        session.client = client[:100] if type(client) is str else None
        worker = obj.get("worker")
        session.worker = worker[:100] if type(worker) is str else None
        host = obj.get("host")
        session.host = host[:255] if type(host) is str else None
        session._who = None
        response: Message = {
            "ok": True,
            "server": "corral",
            "version": PROTOCOL_VERSION,
            "instance": self.instance,
            "session": session.id,
            "auth": "none",
        }
        if self._secret is not None and not session.authenticated:
            session.nonce = self._make_nonce()
            response["auth"] = "challenge"
            response["nonce"] = session.nonce
        return response

    def _auth(self, session: Session, obj: Message, raw: bytes) -> Message:
        if self._secret is None:
            return {"ok": True, "proof": None}
        nonce, session.nonce = session.nonce, None  # a challenge is answered once
        cnonce, proof = obj.get("cnonce"), obj.get("proof")
        if nonce is None or type(cnonce) is not str or type(proof) is not str:
            raise Refused("auth_failed", "send hello first, then auth with cnonce and proof")
        if len(cnonce) < 16:
            raise Refused("auth_failed", "cnonce must be at least 16 characters")
        if not compare_digest(auth_proof(self._secret, "client", nonce, cnonce), proof):
            self.auth_failures += 1
            raise Refused("auth_failed", "wrong secret")
        session.authenticated = True
        return {"ok": True, "proof": auth_proof(self._secret, "server", nonce, cnonce)}

    # ------------------------------------------------------------------ observability

    def _ping(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, "pong": round(self.store.wall() * 1000)}

    def capacity(self) -> dict[str, Any]:
        items, limit = self.store.item_count, self.store.max_items
        utilization = items / limit if limit > 0 else 0.0
        at, near = utilization >= 1.0, utilization >= 0.9
        return {
            "items": items,
            "maxItems": limit,
            "utilization": round(utilization, 4),
            "nearCapacity": near,
            "atCapacity": at,
            "warning": "at_capacity" if at else "near_capacity" if near else None,
        }

    def _stats(self, session: Session, obj: Message, raw: bytes) -> Message:
        facts = self._facts()
        store = self.store
        return {
            "ok": True,
            "stats": {
                "items": self.store.item_count,
                "objects": {"keys": store.key_count, **store.coordination_objects()},
                "leases": self.store.lease_count,
                "capacity": self.capacity(),
                "memory": {
                    "rss": facts["rss"],
                    "approximateStoreBytes": self.store.approx_bytes,
                    "maxBytes": store.max_bytes,
                },
                "uptime": facts["uptime_ms"],
                "connections": facts["connections"],
                "requests": self.requests_total,
                **store.coordination_counts(),
            },
        }

    def _health(self, session: Session, obj: Message, raw: bytes) -> Message:
        facts = self._facts()
        capacity = self.capacity()
        degraded = capacity["nearCapacity"] or self.draining
        return {
            "ok": True,
            "status": "degraded" if degraded else "healthy",
            "uptime": facts["uptime_ms"],
            "timestamp": round(self.store.wall() * 1000),
            "capacity": capacity,
            "memory": {"rss": facts["rss"], "approximateStoreBytes": self.store.approx_bytes},
            "connections": {
                "open": facts["connections"],
                "inFlight": facts["in_flight"],
                "draining": self.draining,
            },
        }

    def _metrics(self, session: Session, obj: Message, raw: bytes) -> Message:
        return {"ok": True, "metrics": self.prometheus(), "format": "prometheus"}

    def prometheus(self) -> str:
        """Prometheus text: the Node broker's metric names plus corral's own."""
        facts = self._facts()
        out = [
            "# HELP ephemeral_broker_operations_total Total number of operations by type",
            "# TYPE ephemeral_broker_operations_total counter",
        ]
        for action, (total, errors) in sorted(self.operations.items()):
            out.append(
                f'ephemeral_broker_operations_total{{action="{action}",result="success"}} '
                f"{total - errors}"
            )
            out.append(
                f'ephemeral_broker_operations_total{{action="{action}",result="error"}} {errors}'
            )
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 0.0
        store = self.store
        counts = store.coordination_counts()
        out += [
            "# HELP ephemeral_broker_compression_total Total values compressed/uncompressed",
            "# TYPE ephemeral_broker_compression_total counter",
            f'ephemeral_broker_compression_total{{compressed="true"}} {self.compressed_sets}',
            f'ephemeral_broker_compression_total{{compressed="false"}} {self.uncompressed_sets}',
            "# HELP ephemeral_broker_compression_bytes_total Total bytes before/after compression",
            "# TYPE ephemeral_broker_compression_bytes_total counter",
            f'ephemeral_broker_compression_bytes_total{{stage="before"}} {self.bytes_before}',
            f'ephemeral_broker_compression_bytes_total{{stage="after"}} {self.bytes_after}',
            "# HELP ephemeral_broker_compression_ratio Current compression ratio",
            "# TYPE ephemeral_broker_compression_ratio gauge",
            f"ephemeral_broker_compression_ratio {ratio:.4f}",
            "# HELP ephemeral_broker_expired_total Total expired items and leases",
            "# TYPE ephemeral_broker_expired_total counter",
            f'ephemeral_broker_expired_total{{type="items"}} {store.expired_items}',
            f'ephemeral_broker_expired_total{{type="leases"}} {store.expired_leases}',
            "# HELP ephemeral_broker_requests_total Total requests processed",
            "# TYPE ephemeral_broker_requests_total counter",
            f"ephemeral_broker_requests_total {self.requests_total}",
            "# HELP ephemeral_broker_requests_in_flight Current in-flight requests",
            "# TYPE ephemeral_broker_requests_in_flight gauge",
            f"ephemeral_broker_requests_in_flight {facts['in_flight']}",
            "# HELP ephemeral_broker_draining Whether broker is draining (1=yes, 0=no)",
            "# TYPE ephemeral_broker_draining gauge",
            f"ephemeral_broker_draining {int(self.draining)}",
            "# HELP corral_broker_items Keys currently stored",
            "# TYPE corral_broker_items gauge",
            f"corral_broker_items {store.item_count}",
            "# HELP corral_broker_leases Leases currently held",
            "# TYPE corral_broker_leases gauge",
            f"corral_broker_leases {store.lease_count}",
            "# HELP corral_broker_holders Locks and pool items held",
            "# TYPE corral_broker_holders gauge",
            f"corral_broker_holders {counts['holders']}",
            "# HELP corral_broker_waiters Requests waiting (lock, pool, once, barrier, pop...)",
            "# TYPE corral_broker_waiters gauge",
            f"corral_broker_waiters {counts['waiters']}",
            "# HELP corral_broker_connections Open client connections",
            "# TYPE corral_broker_connections gauge",
            f"corral_broker_connections {facts['connections']}",
            "# HELP corral_broker_auth_failures_total Requests refused for authentication",
            "# TYPE corral_broker_auth_failures_total counter",
            f"corral_broker_auth_failures_total {self.auth_failures}",
        ]
        return "\n".join(out) + "\n"


_Handler = Callable[[Core, Session, Message, bytes], Message | Ticket]

_HANDLERS: dict[str, _Handler] = {
    "get": Core._get,
    "set": Core._set,
    "del": Core._del,
    "list": Core._list,
    "ping": Core._ping,
    "stats": Core._stats,
    "health": Core._health,
    "metrics": Core._metrics,
    "lease": Core._lease,
    "release": Core._release,
    "hello": Core._hello,
    "auth": Core._auth,
    "add": Core._add,
    "incr": Core._incr,
    "once": Core._once,
    "once_done": Core._once_done,
    "once_fail": Core._once_fail,
    "once_cancel": Core._once_cancel,
    "lock": Core._lock,
    "unlock": Core._unlock,
    "pool": Core._pool,
    "acquire": Core._acquire,
    "release_item": Core._release_item,
    "throttle": Core._throttle,
    "barrier": Core._barrier,
    "push": Core._push,
    "pop": Core._pop,
    "status": Core._status,
}
