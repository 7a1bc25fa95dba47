"""The end-of-run report: what is still held in the broker, and (``-v``) the numbers.

"Why did my run hang?" is usually "someone still holds a lease or a lock": the
controller lists every holding with its holder and age, also after Ctrl-C.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from corral._plugin._database import SLOT_KEY
from corral._plugin._process import CorralProcess

__all__ = ["report", "snapshot"]


def snapshot(process: CorralProcess) -> dict[str, list[dict[str, Any]]]:
    """``{"holders": [...], "waiters": [...]}`` in the run's broker, in one shape.

    Asked over the wire (``status``), so it works for a broker the plugin reuses from
    ``corral run`` too, and for a Redis run (holders on every machine, host-qualified); a
    broker without ``status`` (the Node one) gives what the in-process broker knows, if it
    is ours. The plugin's own database slots are left out.
    """
    held: list[dict[str, Any]] = []
    waiting: list[dict[str, Any]] = []
    status = None
    if process.client is not None:
        try:
            status = process.client.status()
        except Exception:  # an older or foreign broker: no status action
            status = None
    # With Redis the run spans machines, and every machine has a gw0: say which one.
    multi = process.info is not None and bool(process.info.broker_url)
    if status is not None:
        held = [_entry(h, multi) for h in status.get("holders", [])]
        waiting = [_entry(w, multi) for w in status.get("waiters", [])]
    elif process.run is not None:
        held = process.run.holdings()
    return {
        "holders": [h for h in held if h.get("key") != SLOT_KEY],
        "waiters": [w for w in waiting if w.get("key") != SLOT_KEY],
    }


def _entry(entry: dict[str, Any], multi: bool = False) -> dict[str, Any]:
    who = entry.get("who") or {}
    kind = entry.get("kind", "?")
    # A lease names its holder itself; otherwise the client's process is the holder.
    holder = entry.get("worker")
    host = who.get("host") if multi else None
    if not holder and who.get("worker"):
        holder = who["worker"] if not host or "/" in who["worker"] else f"{host}/{who['worker']}"
    if not holder:
        holder = f"pid {who['pid']}" if who.get("pid") else "a one-shot client"
        holder += f" on {host}" if host and who.get("pid") else ""
    value = {"lease": entry.get("item"), "lock": entry.get("token")}.get(kind, entry.get("value"))
    return {
        "kind": kind,
        "key": entry.get("name"),
        "holder": holder,
        "value": value,
        "since": float(entry.get("since") or time.time()),
        "connection": who.get("session") if entry.get("owned", True) else None,
    }


def _describe(h: dict[str, Any]) -> str:
    what = f"{h['kind']} {h['key']!r}"
    if h.get("value") is not None:
        what += f" #{h['value']}" if h["kind"] == "lease" else f" ({h['value']!r})"
    return what


def _age(since: float) -> str:
    seconds = max(0.0, time.time() - since)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def report(process: CorralProcess, terminal: Any, config: pytest.Config) -> None:
    """Write corral's part of the terminal summary."""
    found = process.held_at_interrupt or snapshot(process)
    held, waiting = found["holders"], found["waiters"]
    if held or waiting:
        multi = process.info is not None and bool(process.info.broker_url)
        where = "the Redis run (all machines)" if multi else "the broker"
        terminal.write_sep("=", f"corral warning: still held in {where}", yellow=True, bold=True)
        for h in held:
            terminal.write_line(
                f"{_describe(h)} held by {h['holder']!r} for {_age(h['since'])}"
                + ("" if h.get("connection") is not None else " (one-shot client: TTL only)")
            )
        for w in waiting:
            terminal.write_line(
                f"{_describe(w)} waited for by {w['holder']!r} for {_age(w['since'])}"
            )
        terminal.write_line(
            "A test or fixture took these and never gave them back; anyone waiting for "
            "them waits until the holder's connection closes or the TTL passes."
            + (
                " Holders on other machines may simply still be running their tests."
                if multi
                else ""
            )
        )
    if process.crashed:
        terminal.write_sep("=", "corral: crashed workers", yellow=True)
        terminal.write_line(
            f"{', '.join(process.crashed)} died mid-run; the tests they were running are "
            "reported as failed, and their databases were recycled for the replacements."
        )
    if config.getoption("verbose") < 1:
        return
    terminal.write_sep("-", "corral")
    for name, seconds in process.timings.items():
        terminal.write_line(f"{name}: {seconds * 1000:.0f} ms")
    stats = [process.stats(), *process.worker_stats.values()]
    clones = [t for s in stats for t in s.get("clone", [])]
    recreates = [t for s in stats for t in s.get("recreate", [])]
    if clones:
        recycled = sum(int(s.get("recycled", 0)) for s in stats)
        precloned = sum(int(s.get("precloned", 0)) for s in stats)
        terminal.write_line(
            f"databases: {len(clones)} cloned (mean {1000 * sum(clones) / len(clones):.0f} ms "
            f"to get one; {precloned} made by the controller while its workers booted), "
            f"{recycled} recycled from crashed workers, "
            f"{len(recreates)} recreated after no_sandbox tests"
            + (f" (mean {1000 * sum(recreates) / len(recreates):.0f} ms)" if recreates else "")
        )
    placed = [s["colocated"] for s in stats if s.get("colocated")]
    if placed:
        terminal.write_line(
            "co-located (corral_colocate): "
            + ", ".join(
                f"{p['process']} on CPU {p['cpu']} with {p['pinned']} backends" for p in placed
            )
        )
    else:
        why = next((s["colocate_off"] for s in stats if s.get("colocate_off")), None)
        if why:
            terminal.write_line(f"not co-located: {why}")
    frozen = [int(s["gc_frozen"]) for s in stats if s.get("gc_frozen")]
    if frozen:
        terminal.write_line(
            f"gc.freeze (corral_gc_freeze): {len(frozen)} process(es), "
            f"{sum(frozen) // len(frozen)} objects each kept out of collections"
        )
    opened = sum(int(s.get("sandboxes", 0)) for s in stats)
    seconds = sum(float(s.get("sandbox_seconds", 0.0)) for s in stats)
    if opened:
        terminal.write_line(
            f"sandboxes: {opened} opened and rolled back "
            f"(mean {1000 * seconds / opened:.2f} ms each)"
        )
    if process.client is not None:
        try:
            broker = process.client.stats()
        except Exception as exc:  # the report must never fail the run
            terminal.write_line(f"broker stats unavailable: {exc}")
        else:
            if process.info is not None and process.info.broker_url:
                terminal.write_line(
                    f"broker: Redis run {process.info.run_id!r}: {broker.get('items', '?')} "
                    f"keys, {broker.get('leases', '?')} leases, "
                    f"{broker.get('sessions', '?')} sessions now (all machines)"
                )
                return
            terminal.write_line(
                f"broker: {broker.get('requests', '?')} requests, "
                f"{broker.get('items', '?')} keys, {broker.get('leases', '?')} leases, "
                f"{broker.get('connections', '?')} connections now"
            )
