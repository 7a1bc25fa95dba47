"""Is a process still the one we knew? Liveness that survives pid reuse.

A pid alone is not an identity: after the owner dies the kernel may hand its pid to a new
process. On Linux the start time from ``/proc/PID/stat`` pins the identity down.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of *pid* (clock ticks since boot) on Linux, else ``None``."""
    fields = _stat_fields(pid)
    # After the command name: state is field 3, starttime field 22 -> index 19.
    return fields[19] if fields and len(fields) > 19 else None


def is_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether *pid* runs (not a zombie) and, if *start_time* is given, is the same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, but belongs to someone else
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc (macOS): trust kill(0)
    if fields[0] in {"Z", "X"}:
        return False
    return start_time is None or fields[19] == start_time


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until *pid* is gone (or a zombie); ``True`` if it went within *timeout*."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def terminate(pid: int, timeout: float = 5.0) -> None:
    """Stop a postmaster that is not our child: immediate shutdown, then SIGKILL."""
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, timeout):
            return
