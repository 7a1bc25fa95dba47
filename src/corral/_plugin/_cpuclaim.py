"""Machine-wide claims on CPUs, so the test processes of concurrent runs pin to different CPUs.

Co-location pins each test process (and its database backends) to one CPU. Two runs side
by side on one machine would otherwise both put their ``gw0`` on the first CPU and their
``gw1`` on the second, leaving the other CPUs idle. A process claims its CPU by holding
``flock(LOCK_EX | LOCK_NB)`` on one lock file per CPU (``corral-cpu-<n>.lock`` in
``/tmp``, or ``$CORRAL_CPU_CLAIMS``) for as long as it is pinned; the kernel drops the
lock when the last descriptor of it closes: when the process ends, however it ends (a
child it ``fork()``-ed without ``exec`` shares the descriptor, and the claim, until that
child ends too). The files themselves are empty and stay (the next runs reuse them).

Users share the files: each is created readable by all whatever the umask (``flock``
needs only a read descriptor), opened without ``O_CREAT`` once it exists (as
``fs.protected_regular`` requires for another user's file in ``/tmp``), never through a
symbolic link and never unless it is a regular file. Where they cannot be used, a
process pins as if no claims existed, and says so in the log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ENV_CLAIMS", "CpuClaim", "claim_cpu", "claims_dir", "preference"]

log = logging.getLogger("corral.pytest")

#: A directory for the claim files instead of the system's temporary directory (every run
#: that should coordinate must use the same one).
ENV_CLAIMS = "CORRAL_CPU_CLAIMS"
_DEFAULT_DIR = "/tmp"  # co-location is Linux-only, where /tmp is shared by every user


def claims_dir() -> Path:
    """Where the claim files live: ``$CORRAL_CPU_CLAIMS``, else ``/tmp`` (not ``$TMPDIR``,
    which differs between users and CI jobs that must still see each other's claims)."""
    return Path(os.environ.get(ENV_CLAIMS) or _DEFAULT_DIR)


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


_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


def _open(path: Path) -> int | None:
    """A read-only descriptor of the claim file *path*, creating it readable by all.

    Never through a symbolic link, never blocking (a FIFO planted there would hang
    ``open``), and only a regular file. An existing file is opened without ``O_CREAT``:
    with ``fs.protected_regular`` that flag fails on another user's file in ``/tmp``.
    """
    try:
        try:
            fd = os.open(path, _FLAGS)
        except FileNotFoundError:
            try:
                fd = os.open(path, _FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another process made it just now
                fd = os.open(path, _FLAGS)
            else:
                os.fchmod(fd, 0o644)  # whatever the umask: other users must open it too
    except OSError as exc:
        log.debug("cannot open the CPU claim file %s: %s", path, exc)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        log.debug("the CPU claim file %s is not a regular file", path)
        os.close(fd)
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
    if usable:
        return None
    log.info(
        "corral_colocate: CPU claims cannot be made in %s (see CORRAL_CPU_CLAIMS); "
        "pinning without them, so runs side by side may share CPUs",
        directory,
    )
    return CpuClaim(order[0], None)
