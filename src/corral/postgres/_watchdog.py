"""Watchdog process: stops a throwaway server and removes its directory when its owner dies.

Run as a script (``python -I -S _watchdog.py OWNER_PID OWNER_START POSTMASTER_PID RUN_DIR``),
so it imports only the standard library and starts in milliseconds. It lives in its own
session, so it outlives a SIGKILLed owner; it exits by itself when the postmaster exits.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

_POLL_SECONDS = 0.2


def _alive(pid: int, start_time: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = raw[raw.rfind(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return False
    return start_time in {"", "-"} or fields[19] == start_time


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


def _wait_for_either(owner: int, owner_start: str, postmaster: int) -> bool:
    """Block until the owner or the postmaster is gone; ``True`` if the owner went first."""
    owner_fd, pm_fd = _pidfd(owner), _pidfd(postmaster)
    if owner_fd is not None and pm_fd is not None and _alive(owner, owner_start):
        poller = select.poll()
        poller.register(owner_fd, select.POLLIN)
        poller.register(pm_fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if pm_fd in ready:
                return False
            if owner_fd in ready:
                return True
    while True:  # no pidfd (old kernel, macOS): poll
        if not _alive(postmaster, ""):
            return False
        if not _alive(owner, owner_start):
            return True
        time.sleep(_POLL_SECONDS)


def _stop(postmaster: int) -> None:
    # SIGQUIT = immediate shutdown: the cluster is thrown away, so no checkpoint is needed.
    for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(postmaster, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(postmaster, ""):
                return
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    owner, owner_start, postmaster, run_dir = int(argv[0]), argv[1], int(argv[2]), Path(argv[3])
    # Ctrl-C in the owner's terminal must not kill the watchdog before it did its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _wait_for_either(owner, owner_start, postmaster):
        _stop(postmaster)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
