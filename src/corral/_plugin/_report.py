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

__all__ = ["report", "user_holdings"]


def user_holdings(process: CorralProcess) -> list[dict[str, Any]]:
    """What is held in the run's broker, except the plugin's own database slots."""
    if process.held_at_interrupt is not None:
        held = process.held_at_interrupt
    elif process.run is not None:
        held = process.run.holdings()
    else:
        held = []
    return [h for h in held if h.get("key") != SLOT_KEY]


def _age(since: float) -> str:
    seconds = max(0.0, time.time() - since)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def report(process: CorralProcess, terminal: Any, config: pytest.Config) -> None:
    """Write corral's part of the terminal summary."""
    held = user_holdings(process)
    if held:
        terminal.write_sep("=", "corral warning: still held in the broker", yellow=True, bold=True)
        for h in held:
            terminal.write_line(
                f"{h['kind']} {h['key']!r} #{h['value']} held by {h['holder']!r} "
                f"for {_age(h['since'])}"
                + ("" if h.get("connection") is not None else " (one-shot client: TTL only)")
            )
        terminal.write_line(
            "A test or fixture took these and never gave them back; anyone waiting for "
            "them waits until the holder's connection closes or the TTL passes."
        )
    if process.crashed:
        terminal.write_sep("=", "corral: crashed workers", yellow=True)
        terminal.write_line(
            f"{', '.join(process.crashed)} died mid-run; the tests they were running are "
            "reported as failed, and their databases were recycled for the replacements."
        )
    if config.get_verbosity() < 1:
        return
    terminal.write_sep("-", "corral")
    for name, seconds in process.timings.items():
        terminal.write_line(f"{name}: {seconds * 1000:.0f} ms")
    stats = [process.stats(), *process.worker_stats.values()]
    clones = [t for s in stats for t in s.get("clone", [])]
    recreates = [t for s in stats for t in s.get("recreate", [])]
    if clones:
        recycled = sum(int(s.get("recycled", 0)) for s in stats)
        terminal.write_line(
            f"databases: {len(clones)} cloned (mean {1000 * sum(clones) / len(clones):.0f} ms), "
            f"{recycled} recycled from crashed workers, "
            f"{len(recreates)} recreated after no_sandbox tests"
            + (f" (mean {1000 * sum(recreates) / len(recreates):.0f} ms)" if recreates else "")
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
            terminal.write_line(
                f"broker: {broker.get('requests', '?')} requests, "
                f"{broker.get('items', '?')} keys, {broker.get('leases', '?')} leases, "
                f"{broker.get('connections', '?')} connections now"
            )
