"""The end of a run: its check across machines, and the report — what is still held in
the broker, the tests a Redis run lost or ran twice, and (``-v``) the numbers.

"Why did my run hang?" is usually "someone still holds a lease or a lock": the
controller lists every holding with its holder and age, also after Ctrl-C.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from corral._plugin._process import CorralProcess
from corral._plugin._run import SLOT_KEY

__all__ = ["finish_run", "report", "snapshot"]

# Node ids named per section of the verdict; the rest are counted.
_NAMED = 50


def finish_run(process: CorralProcess, session: pytest.Session) -> None:
    """At the controller's session end: the exit code of a shard, and the run's check.

    A shard that ``--corral-shard`` left empty passed (its tests belong to the others);
    with ``--corral-machines`` a run that lost a test, or ran one twice, fails.
    """
    owed = process.owed()
    if (
        process.settings.shard is not None
        and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED
        and owed
    ):
        session.exitstatus = pytest.ExitCode.OK
    census = process.run.census if process.run is not None else None
    if census is None:
        return
    process.verdict = verdict = census.finish(owed, process.ran)
    failed = verdict is not None and not verdict.ok and process.settings.machines is not None
    if failed and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    client = process.broker_client()
    if client is not None:
        try:
            status = client.status()
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
    # The machine of the run (its CORRAL_HOST) when the holder's name says it.
    machine = holder.partition("/")[0] if multi and "/" in holder else None
    value = {"lease": entry.get("item"), "lock": entry.get("token")}.get(kind, entry.get("value"))
    return {
        "kind": kind,
        "key": entry.get("name"),
        "holder": holder,
        "value": value,
        "since": float(entry.get("since") or time.time()),
        "connection": who.get("session") if entry.get("owned", True) else None,
        "machine": machine,
        "hostname": host,
    }


def _running_machine(h: dict[str, Any], running: list[dict[str, Any]]) -> str | None:
    """The other machine of the run, not finished yet, that *h*'s holder runs on."""
    for state in running:
        if h.get("machine") is not None:
            if h["machine"] == state.get("host"):
                return str(h["machine"])
        # Without a machine name, the host name tells machines apart only on other hosts.
        elif h.get("hostname") not in (None, socket.gethostname()) and h.get(
            "hostname"
        ) == state.get("hostname"):
            return str(state.get("host"))
    return None


def _describe(h: dict[str, Any]) -> str:
    what = f"{h['kind']} {h['key']!r}"
    if h.get("value") is not None:
        what += f" #{h['value']}" if h["kind"] == "lease" else f" ({h['value']!r})"
    return what


def _age(since: float) -> str:
    seconds = max(0.0, time.time() - since)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _report_held(
    process: CorralProcess,
    terminal: Any,
    held: list[dict[str, Any]],
    waiting: list[dict[str, Any]],
) -> None:
    multi = process.info is not None and bool(process.info.broker_url)
    census = process.run.census if process.run is not None else None
    running = census.running() if census is not None else []
    where = "the Redis run (all machines)" if multi else "the broker"
    terminal.write_sep("=", f"corral warning: still held in {where}", yellow=True, bold=True)
    kept = 0
    for h in held:
        machine = _running_machine(h, running)
        if machine is not None:
            terminal.write_line(
                f"{_describe(h)} held by {machine}, which is still running "
                f"({h['holder']!r}, for {_age(h['since'])})"
            )
            continue
        kept += 1
        terminal.write_line(
            f"{_describe(h)} held by {h['holder']!r} for {_age(h['since'])}"
            + ("" if h.get("connection") is not None else " (one-shot client: TTL only)")
        )
    for w in waiting:
        terminal.write_line(f"{_describe(w)} waited for by {w['holder']!r} for {_age(w['since'])}")
    if kept or not held:
        terminal.write_line(
            "A test or fixture took these and never gave them back; anyone waiting for "
            "them waits until the holder's connection closes or the TTL passes."
            + (
                " Holders on machines whose state is unknown may still be running."
                if multi and census is None
                else ""
            )
        )
    if kept < len(held):
        terminal.write_line(
            f"Machines still running hold {'the others' if kept else 'these'}: they give "
            "them back when their tests end."
        )


def _named(nodeids: list[str]) -> list[str]:
    more = len(nodeids) - _NAMED
    return nodeids[:_NAMED] + ([f"... and {more} more"] if more > 0 else [])


def _report_verdict(process: CorralProcess, terminal: Any) -> None:
    verdict = process.verdict
    assert verdict is not None
    error = process.settings.machines is not None
    kind = "corral error" if error else "corral warning"
    color = {"red": True} if error else {"yellow": True}
    about = f"{verdict.tests} tests owed by {verdict.machines} machine(s) of the Redis run"
    if verdict.lost:
        terminal.write_sep(
            "=", f"{kind}: {len(verdict.lost)} test(s) ran on no machine", bold=True, **color
        )
        for line in _named(verdict.lost):
            terminal.write_line(line)
        shards = ", ".join(verdict.lost_shards)
        terminal.write_line(
            f"Of the {about}, these ran nowhere"
            + (f" (no machine ran shard {shards})" if shards else "")
            + ": each machine runs only what it collected and selected, so give the "
            "machines together every shard (--corral-shard 1/N ... N/N)."
        )
    if verdict.twice:
        terminal.write_sep(
            "=",
            f"{kind}: {len(verdict.twice)} test(s) ran on more than one machine",
            bold=True,
            **color,
        )
        lines = [f"{nodeid} (on {', '.join(by)})" for nodeid, by in verdict.twice.items()]
        for line in _named(lines):
            terminal.write_line(line)
        terminal.write_line(
            f"Of the {about}, these ran more than once: the machines' shards overlap "
            "(--corral-shard K/N with one N and each K once splits without overlap)."
        )
    if error:
        terminal.write_line("The run fails: --corral-machines says it is complete.")


def report(process: CorralProcess, terminal: Any, config: pytest.Config) -> None:
    """Write corral's part of the terminal summary."""
    found = process.held_at_interrupt or snapshot(process)
    held, waiting = found["holders"], found["waiters"]
    if held or waiting:
        _report_held(process, terminal, held, waiting)
    if process.verdict is not None and not process.verdict.ok:
        _report_verdict(process, terminal)
    if process.crashed:
        terminal.write_sep("=", "corral: crashed workers", yellow=True)
        terminal.write_line(
            f"{', '.join(process.crashed)} died mid-run; the tests they were running are "
            "reported as failed, and their databases were recycled for the replacements."
        )
    stats = [process.stats(), *process.worker_stats.values()]
    for line in sorted({line for s in stats for line in s.get("degraded", [])}):
        terminal.write_line(line, yellow=True)
    if config.getoption("verbose") < 1:
        return
    terminal.write_sep("-", "corral")
    for name, seconds in process.timings.items():
        terminal.write_line(f"{name}: {seconds * 1000:.0f} ms")
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
    client = process.broker_client()
    if client is None and process.run is not None and process.run.broker is not None:
        terminal.write_line("broker: not used (nobody connected to it)")
    elif client is not None:
        try:
            broker = client.stats()
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
