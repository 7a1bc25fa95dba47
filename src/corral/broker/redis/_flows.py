"""The Redis backend's operations, written once as generators both clients drive.

A flow yields :class:`Script`, :class:`Command`, :class:`Wait` or :class:`Sleep` and is
resumed with the result; :mod:`corral.broker.redis` only executes them (blocking or
asyncio). Values travel as JSON text; every timeout is measured on the client's clock.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from corral.broker._flows import (
    MISSING,
    check_name,
    check_rate,
    check_seconds,
    check_timeout,
)
from corral.errors import (
    BarrierBroken,
    BrokerRequestError,
    BrokerTimeout,
    OnceFailed,
    ProtocolError,
    error_from_code,
)

Arg = str | int | float

#: A blocking pop is re-armed after this many seconds, so a silently dead connection
#: (a network partition) is noticed; it is not a polling interval: wake-ups are pushed.
WAIT_SLICE: Final = 30.0
#: BLPOP's timeout resolution; a smaller positive timeout could round to 0 (= forever).
_MIN_BLOCK: Final = 0.01


@dataclass(slots=True)
class Script:
    """Run Lua script *name* (EVALSHA) with *args*; resume with its reply.

    :ivar cancel: for a script that may queue a ticket or take a claim: what undoes it
        when the call is interrupted before its reply is known (the driver runs it).
    """

    name: str
    args: list[Arg]
    cancel: Script | None = None


@dataclass(slots=True)
class Command:
    """Run one plain Redis command; resume with its reply."""

    args: tuple[Arg, ...]


@dataclass(slots=True)
class Wait:
    """BLPOP *key* for up to *timeout* seconds; resume with the element or None.

    :ivar cancel: the script that undoes the wait when it is interrupted (Ctrl-C, task
        cancellation, a broken connection): the driver runs it before re-raising.
    :ivar into: BLMOVE instead: the element moves from the head of *key* to the tail of
        this list in the same step, so it is never only in flight to the client.
    """

    key: str
    timeout: float
    cancel: Script | None = None
    into: str | None = None


@dataclass(slots=True)
class Sleep:
    """Sleep *seconds* (a throttle slot reserved in Redis starts then)."""

    seconds: float


Op = Script | Command | Wait | Sleep
Flow = Generator[Op, Any, Any]


@dataclass(frozen=True, slots=True)
class Grant:
    """A lock or pool item held by this client: what ``release`` needs."""

    kind: str
    name: str
    tid: str
    sid: str
    token: int
    value: Any


# ---------------------------------------------------------------------- helpers


def dumps(value: Any) -> str:
    """JSON text of *value*.

    :raises TypeError: *value* is not JSON (NaN, sets, objects, cycles), before any I/O.
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise TypeError(f"value is not JSON-serialisable: {exc}") from exc


def ttl_ms(ttl: float | None, default_ms: int) -> int:
    """Milliseconds for a TTL in seconds (the default when None); at least 1 ms."""
    if ttl is None:
        return default_ms
    check_seconds(ttl, "ttl")
    if not (math.isfinite(ttl) and ttl > 0):
        raise error_from_code("invalid_ttl", detail=f"got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def checked(reply: Any, key: str | None = None) -> Any:
    """Raise the mapped error for a script's ``{"err", code, detail}`` reply."""
    if isinstance(reply, list) and reply and reply[0] == "err":
        raise error_from_code(str(reply[1]), key=key, detail=str(reply[2]))
    return reply


def timed_out(what: str, name: str, timeout: float | None) -> BrokerTimeout:
    exc = error_from_code("timeout", key=name, detail=f"{what} waited {timeout} s")
    assert isinstance(exc, BrokerTimeout)
    return exc


def wait_for(
    key: str, deadline: float | None, cancel: Script, into: str | None = None
) -> Generator[Op, Any, str | None]:
    """Block until Redis pushes a wake-up (or an item) to *key*, or *deadline* (monotonic)
    passes; with *into*, the element is moved there (BLMOVE) rather than popped."""
    while True:
        if deadline is None:
            slice_ = WAIT_SLICE
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            slice_ = max(_MIN_BLOCK, min(remaining, WAIT_SLICE))
        message = yield Wait(key, slice_, cancel, into)
        if message is not None:
            return str(message)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


# ---------------------------------------------------------------------- key/value


def get(prefix: str, key: str, default: Any = MISSING) -> Flow:
    raw = yield Command(("GET", prefix + "k:" + check_name(key)))
    if raw is not None:
        return json.loads(raw)
    if default is not MISSING:
        return default
    # Expired keys keep their deadline for a while: it tells "expired" from "never set".
    deadline = yield Command(("ZSCORE", prefix + "exp", key))
    raise error_from_code("expired" if deadline is not None else "not_found", key=key)


def set_(key: str, value: Any, ttl: float | None, default_ms: int, nx: bool = False) -> Flow:
    check_name(key)
    text = dumps(value)
    ms = ttl_ms(ttl, default_ms)
    stored = yield Script("set", [key, text, ms, 1 if nx else 0])
    return bool(stored)


def delete(key: str) -> Flow:
    return bool((yield Script("delete", [check_name(key)])))


def keys() -> Flow:
    return [str(k) for k in (yield Script("keys", []))]


def incr(key: str, amount: int, ttl: float | None, default_ms: int) -> Flow:
    check_name(key)
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int, got {type(amount).__name__}")
    ms = "" if ttl is None else ttl_ms(ttl, default_ms)
    reply = checked((yield Script("incr", [key, amount, ms, default_ms])), key)
    return int(reply[1])


# ---------------------------------------------------------------------- leases


def _worker(worker_id: str) -> str:
    if isinstance(worker_id, bool) or not isinstance(worker_id, str | int):  # type: ignore[unreachable,unused-ignore]
        raise TypeError(f"worker_id must be a str, got {type(worker_id).__name__}")
    return check_name(str(worker_id), "worker_id")


def lease(sid: str, key: str, worker_id: str, ttl: float | None, default_ms: int) -> Flow:
    check_name(key)
    worker = _worker(worker_id)
    ms = ttl_ms(ttl, default_ms)
    reply = checked((yield Script("lease", [sid, key, worker, ms])), key)
    return int(reply[1])


def release(worker_id: str) -> Flow:
    return bool((yield Script("release", [_worker(worker_id)])))


# ---------------------------------------------------------------------- locks, pools


def pool(name: str, items: Sequence[Any]) -> Flow:
    check_name(name, "pool name")
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise TypeError("items must be a list of JSON values")
    if not items:
        raise ValueError(f"pool {name!r} needs at least one item")
    texts = [dumps(item) for item in items]
    canonical = json.dumps(list(items), sort_keys=True, separators=(",", ":"))
    reply = checked((yield Script("pool", [name, canonical, *texts])), name)
    return bool(reply[1])


def acquire(
    prefix: str, sid: str, tid: str, kind: str, name: str, ttl: float | None, timeout: float | None
) -> Flow:
    """Take an item (a lock is a pool of one), waiting in FIFO order; yields a Grant."""
    check_name(name, f"{kind} name")
    ms = 0 if ttl is None else ttl_ms(ttl, 0)
    timeout = check_timeout(timeout)
    deadline = _deadline(timeout)
    wait = 0 if timeout == 0 else 1
    cancel = Script("cancel", [sid, tid, kind, name])
    reply = checked((yield Script("acquire", [sid, tid, kind, name, ms, wait], cancel)), name)
    if reply[0] == "ok":
        return Grant(kind, name, tid, sid, int(reply[2]), json.loads(reply[3]))
    if reply[0] == "busy":
        raise timed_out(kind, name, timeout)
    grant = yield from _woken(prefix, tid, deadline, cancel, kind, name, timeout)
    if "lost" in grant:
        raise _session_lost(name, grant["lost"])
    return Grant(kind, name, tid, sid, int(grant["token"]), json.loads(grant["value"]))


def _woken(
    prefix: str,
    tid: str,
    deadline: float | None,
    cancel: Script,
    what: str,
    name: str,
    timeout: float | None,
) -> Generator[Op, Any, dict[str, Any]]:
    """The wake-up event pushed to waiter *tid*; at *deadline* the wait is cancelled and
    :class:`~corral.errors.BrokerTimeout` raised."""
    message = yield from wait_for(prefix + "w:" + tid, deadline, cancel)
    if message is None:
        yield cancel
        raise timed_out(what, name, timeout)
    event: dict[str, Any] = json.loads(message)
    return event


def unhold(grant: Grant) -> Flow:
    """Free a lock/pool item; False when it was no longer held (TTL or session expired)."""
    return bool((yield Script("unhold", [grant.sid, grant.tid])))


# ---------------------------------------------------------------------- once


@dataclass(frozen=True, slots=True)
class Claim:
    """This caller must compute the value of ``once(key)`` (it holds the claim)."""

    key: str
    sid: str
    tid: str


def once_begin(prefix: str, sid: str, tid: str, key: str, timeout: float | None) -> Flow:
    """The stored value, or a :class:`Claim` when this caller must compute it."""
    check_name(key)
    timeout = check_timeout(timeout)
    deadline = _deadline(timeout)
    cancel = Script("cancel", [sid, tid, "once", key])
    reply = checked((yield Script("once_begin", [key, sid, tid], cancel)), key)
    status = reply[0]
    if status == "done":
        return json.loads(reply[1])
    if status == "failed":
        raise _once_failed(key, str(reply[1] or ""), str(reply[2] or ""))
    if status == "compute":
        return Claim(key, sid, tid)
    event = yield from _woken(prefix, tid, deadline, cancel, "once", key, timeout)
    if "lost" in event:
        raise _session_lost(key, event["lost"])
    if event.get("elect"):
        return Claim(key, sid, tid)
    if event.get("failed"):
        raise _once_failed(key, str(event.get("msg", "")), str(event.get("etype", "")))
    return json.loads(event["value"])


def give_up(claim: Claim) -> Script:
    """Hand the claim on to the next waiter (the computer was interrupted, not failed)."""
    return Script("cancel", [claim.sid, claim.tid, "once", claim.key])


def once_done(claim: Claim, value: Any, ttl: float | None, default_ms: int) -> Flow:
    text = dumps(value)
    ms = ttl_ms(ttl, default_ms)
    reply = yield Script("once_done", [claim.key, claim.sid, text, ms])
    return json.loads(reply[1]) if reply[0] == "done" else value


def once_fail(claim: Claim, exc: BaseException, ttl: float | None, default_ms: int) -> Flow:
    ms = ttl_ms(ttl, default_ms)
    message = str(exc) or repr(exc)
    yield Script("once_fail", [claim.key, claim.sid, message, type(exc).__name__, ms])


def _once_failed(key: str, message: str, error_type: str) -> OnceFailed:
    return OnceFailed(
        f"once_failed: computing {key!r} raised {error_type}: {message}",
        key=key,
        original=message,
        error_type=error_type,
    )


# ---------------------------------------------------------------------- barrier, throttle


def barrier(
    prefix: str, sid: str, tid: str, name: str, parties: int, timeout: float | None
) -> Flow:
    check_name(name, "barrier name")
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise ValueError(f"parties must be a positive int, got {parties!r}")
    timeout = check_timeout(timeout)
    deadline = _deadline(timeout)
    cancel = Script("cancel", [sid, tid, "barrier", name])
    reply = checked((yield Script("barrier", [name, parties, sid, tid], cancel)), name)
    if reply[0] == "broken":
        raise _broken(name, str(reply[1]))
    index = int(reply[1])
    if reply[0] == "passed":
        return index
    event = yield from _woken(prefix, tid, deadline, cancel, "barrier", name, timeout)
    if "broken" in event:
        raise _broken(name, str(event["broken"]))
    if "lost" in event:  # this member's own session expired: the barrier broke with it
        raise _broken(name, str(event["lost"]))
    return index


def _session_lost(name: str, reason: Any) -> BrokerRequestError:
    """This waiter's session expired while it waited (its process was starved or paused);
    the client renews the session and waits again (see ``RedisClient._owned``)."""
    return BrokerRequestError(
        f"session_lost: the wait for {name!r} was dropped: {reason}", code="session_lost", key=name
    )


def _broken(name: str, reason: str) -> BarrierBroken:
    return BarrierBroken(
        f"barrier_broken: barrier {name!r} is broken: {reason}", key=name, reason=reason
    )


def throttle(name: str, rate: float, per: float, timeout: float | None) -> Flow:
    """Reserve the next slot under the run-wide rate, then sleep until it starts."""
    check_rate(name, rate, per)
    timeout = check_timeout(timeout)
    if float(rate).is_integer():
        calls, window = int(rate), per
    else:  # a fractional rate: one call per per/rate seconds
        calls, window = 1, per / rate
    limit = -1 if timeout is None else timeout * 1000
    reply = yield Script("throttle", [name, calls, window * 1000, limit])
    wait = float(reply[1]) / 1000
    if reply[0] == "timeout":
        raise timed_out("throttle", name, timeout)
    if wait > 0:
        yield Sleep(wait)
    return None


# ---------------------------------------------------------------------- queues


def push(queue: str, items: tuple[Any, ...]) -> Flow:
    check_name(queue, "queue name")
    if not items:
        raise ValueError("push needs at least one item")
    texts = [dumps(item) for item in items]
    length = 0
    for start in range(0, len(texts), 1000):  # Lua's unpack() has a stack limit
        length = yield Script("push", [queue, *texts[start : start + 1000]])
    return int(length)


def pop(prefix: str, sid: str, tid: str, queue: str, timeout: float | None) -> Flow:
    """Take the first item of *queue* as a reliable queue does.

    The item moves atomically into the pop's in-flight list (recorded under session
    *sid*) and is removed from there (acknowledged) only once it has reached this client;
    an interrupted pop puts it back at the head of the queue, and so does the reaper when
    the popping process dies. The ack is the last step, so the caller holds the item as
    soon as Redis counts it delivered.
    """
    check_name(queue, "queue name")
    timeout = check_timeout(timeout)
    deadline = _deadline(timeout)
    cancel = Script("unpop", [sid, tid, queue, "", 0])
    wait = 0 if timeout == 0 else 1
    reply = checked((yield Script("pop", [sid, tid, queue, wait], cancel)), queue)
    if reply[0] == "empty":
        raise timed_out("pop", queue, timeout)
    if reply[0] == "ok":
        raw = str(reply[1])
    else:
        moved = yield from wait_for(prefix + "qu:" + queue, deadline, cancel, prefix + "qi:" + tid)
        if moved is None:  # BLMOVE timed out in Redis: nothing can arrive any more
            yield Script("unpop", [sid, tid, queue, "", 1])
            raise timed_out("pop", queue, timeout)
        raw = moved
    if not (yield Script("ack", [sid, tid, queue], Script("unpop", [sid, tid, queue, raw, 1]))):
        # This session was reaped while the item was in flight (a paused process): it
        # went back to the queue, so another pop may deliver it. Pop again, renewed.
        raise _session_lost(queue, "the session expired while the item was in flight")
    return json.loads(raw)


def purge_last(sid: str | None) -> Generator[Op, Any, int | None]:
    """Delete the run's keys when no other session is live: how many, else None."""
    reply = yield Script("purge_last", [sid or ""])
    return int(reply[1]) if reply[0] == "purged" else None


# ---------------------------------------------------------------------- status


def _who(sid: str, sinfo: dict[str, Any]) -> dict[str, Any]:
    info = dict(sinfo.get(sid) or {})
    info["session"] = sid
    return info


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def status() -> Flow:
    reply = yield Script("status", [])
    if not isinstance(reply, list) or len(reply) != 8:
        raise ProtocolError(f"unexpected status reply from Redis: {reply!r}")
    now = int(reply[0])
    deadlines = {sid: float(score) for sid, score in _pairs(reply[1]).items()}
    sinfo = {sid: json.loads(raw) for sid, raw in _pairs(reply[2]).items()}
    holders: list[dict[str, Any]] = []
    for tid, raw in _pairs(reply[3]).items():
        h = json.loads(raw)
        holders.append(
            {
                "kind": h["kind"],
                "name": h["name"],
                "item": h["item"],
                "token": h["token"],
                "who": _who(h["sid"], sinfo),
                "since": h["since"] / 1000,
                "ttl_left": (h["exp"] - now) / 1000 if h["exp"] else None,
                "ticket": tid,
            }
        )
    lease_deadlines = {w: float(s) for w, s in _pairs(reply[6]).items()}
    for worker, raw in _pairs(reply[5]).items():
        lease_ = json.loads(raw)
        holders.append(
            {
                "kind": "lease",
                "name": lease_["key"],
                "item": lease_["n"],
                "worker": worker,
                "who": _who(lease_["sid"], sinfo),
                "since": lease_.get("since", now) / 1000,
                "ttl_left": (lease_deadlines.get(worker, now) - now) / 1000,
            }
        )
    once = reply[7]
    for i in range(0, len(once), 3):
        holders.append(
            {
                "kind": "once",
                "name": once[i],
                "who": _who(once[i + 2], sinfo),
                "since": float(once[i + 1]) / 1000,
                "ttl_left": None,
            }
        )
    waiters = []
    for tid, raw in _pairs(reply[4]).items():
        t = json.loads(raw)
        waiters.append(
            {
                "kind": t["kind"],
                "name": t["name"],
                "who": _who(t["sid"], sinfo),
                "since": t["since"] / 1000,
                "ticket": tid,
            }
        )
    sessions = [
        dict(_who(sid, sinfo), expires_in=(deadline - now) / 1000)
        for sid, deadline in deadlines.items()
    ]
    holders.sort(key=lambda entry: entry["since"])
    waiters.sort(key=lambda entry: entry["since"])
    return {"holders": holders, "waiters": waiters, "sessions": sessions, "time": now / 1000}


def stats() -> Flow:
    reply = yield Script("stats", [])
    items, leases, sessions, holders, waiters, _now = (int(x) for x in reply)
    return {
        "items": items,
        "leases": leases,
        "sessions": sessions,
        "holders": holders,
        "waiters": waiters,
    }
