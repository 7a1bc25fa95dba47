"""Machine-wide claims on CPUs, so the test processes of concurrent runs pin to different CPUs.

Co-location pins each test process (and its database backends) to one CPU. Two runs side
by side on one machine would otherwise both put their ``gw0`` on the first CPU and their
``gw1`` on the second, leaving the other CPUs idle. A process claims its CPU by holding
``flock(LOCK_EX | LOCK_NB)`` on one lock file per CPU (``corral-cpu-<n>.lock`` in the
system's temporary directory, or ``$CORRAL_CPU_CLAIMS``) for as long as it is pinned; the
kernel drops the lock when the process ends, however it ends, so a killed run never keeps
a CPU. The files themselves are empty and stay (they are reused by the next runs).

Any user may claim: the files are created readable by all (``flock`` needs only a read
descriptor), never through a symbolic link. Where they cannot be opened, a process pins
as if no claims existed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ENV_CLAIMS", "CpuClaim", "claim_cpu", "claims_dir", "preference"]

log = logging.getLogger("corral.pytest")

#: A directory for the claim files instead of the system's temporary directory (every run
#: that should coordinate must use the same one).
ENV_CLAIMS = "CORRAL_CPU_CLAIMS"


def claims_dir() -> Path:
    """Where the claim files live: ``$CORRAL_CPU_CLAIMS``, else the temporary directory."""
    return Path(os.environ.get(ENV_CLAIMS) or tempfile.gettempdir())


def preference(allowed: Iterable[int], first: int) -> list[int]:
    """The allowed CPUs in the order a process tries them: from *first* (an index into
    the sorted CPUs, wrapping) onwards, so worker n starts at the n-th CPU."""
    cpus = sorted(allowed)
    if not cpus:
        return []
    start = first % len(cpus)
    return cpus[start:] + cpus[:start]


class CpuClaim:
    """This process's claim on one CPU; :meth:`release` (or process exit) gives it up."""

    def __init__(self, cpu: int, fd: int | None) -> None:
        self.cpu = cpu
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the claim (closing the file drops the lock). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _open(path: Path) -> int | None:
    flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        log.debug("cannot open the CPU claim file %s: %s", path, exc)
        return None
    return fd


def claim_cpu(cpus: Iterable[int], directory: Path | None = None) -> CpuClaim | None:
    """Claim the first of *cpus* (in order) that no other process claims.

    :returns: the claim; ``None`` when every one is claimed by other processes. Where
        claims cannot be made at all (no usable directory, no ``flock``), an unheld claim
        on the first CPU: the process pins there as if no claims existed.
    """
    order = list(cpus)
    if not order:
        return None
    directory = directory if directory is not None else claims_dir()
    usable = False
    for cpu in order:
        fd = _open(directory / f"corral-cpu-{cpu}.lock")
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            usable = True
            os.close(fd)
            continue  # another process sits there
        except OSError as exc:  # a file system without flock
            log.debug("cannot lock the CPU claim file for CPU %d: %s", cpu, exc)
            os.close(fd)
            continue
        return CpuClaim(cpu, fd)
    return None if usable else CpuClaim(order[0], None)
