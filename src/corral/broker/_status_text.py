"""Render a broker status dump (holders, waiters, sessions) as the text `corral status` prints.

Shared by both backends: the socket broker's and the Redis backend's ``status()`` have
the same shape.
"""

from __future__ import annotations

from typing import Any

__all__ = ["render_status"]


def _who(who: dict[str, Any]) -> str:
    parts = []
    if who.get("worker"):
        parts.append(str(who["worker"]))
    if who.get("pid") is not None:
        parts.append(f"pid {who['pid']}")
    if who.get("host"):
        parts.append(f"on {who['host']}")
    if who.get("session") is not None:
        parts.append(f"(session {who['session']})")
    return " ".join(parts) if parts else "a one-shot client"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _left(seconds: float | None, none: str) -> str:
    return none if seconds is None else _age(seconds)


def _what(entry: dict[str, Any]) -> str:
    kind = entry["kind"]
    if kind == "lock":
        return f"token {entry.get('token')}"
    if kind == "pool":
        return f"item {entry.get('value', entry.get('item'))!r}"
    if kind == "lease":
        return f"#{entry.get('item')} for worker {entry.get('worker')!r}"
    return "computing"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip


def render_status(status: dict[str, Any]) -> str:
    """Human-readable holders and waiters, oldest first, with who, age and TTL left."""
    now = float(status.get("time") or 0.0)
    holders: list[dict[str, Any]] = status.get("holders", [])
    waiters: list[dict[str, Any]] = status.get("waiters", [])
    sessions: list[dict[str, Any]] = status.get("sessions", [])
    out: list[str] = []
    if holders:
        out.append(f"HOLDERS ({len(holders)})")
        rows = [["KIND", "NAME", "WHAT", "WHO", "HELD FOR", "TTL LEFT"]]
        for h in holders:
            rows.append(
                [
                    h["kind"],
                    str(h["name"]),
                    _what(h),
                    _who(h.get("who") or {}),
                    _age(now - h["since"]),
                    _left(h.get("ttl_left"), "until released"),
                ]
            )
        out += _table(rows)
    if waiters:
        out.append(f"WAITERS ({len(waiters)})")
        rows = [["KIND", "NAME", "WHO", "WAITING FOR", "TIMEOUT LEFT"]]
        for w in waiters:
            rows.append(
                [
                    w["kind"],
                    str(w["name"]),
                    _who(w.get("who") or {}),
                    _age(now - w["since"]),
                    _left(w.get("timeout_left"), "none"),
                ]
            )
        out += _table(rows)
    if not holders and not waiters:
        out.append("Nothing is held and nobody waits.")
    if sessions:
        out.append(f"CLIENTS ({len(sessions)} connected)")
        out += [f"  {_who(s)}" for s in sessions]
    return "\n".join(out) + "\n"
