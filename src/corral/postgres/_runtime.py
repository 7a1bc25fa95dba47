"""The runtime directory: where running clusters live, and the clean-up of dead owners' ones.

Each cluster is ``<runtime>/run-XXXX/`` holding ``owner.json`` (owner pid, its start time,
postmaster pid), the data directory, the Unix socket and the log. A directory whose owner is
gone is stale: its server is stopped and the directory removed by the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.errors import PostgresStartError
from corral.postgres._binaries import PostgresBinaries
from corral.postgres._osuser import ServerUser, can_traverse
from corral.postgres._procs import is_alive, terminate

log = logging.getLogger("corral.postgres")

OWNER_FILE = "owner.json"
#: a run directory without an owner file younger than this may be mid-creation.
_GRACE_SECONDS = 60.0
#: below this much free space, tmpfs (/dev/shm) is not used (Docker's default is 64 MB).
_MIN_SHM_FREE = 1 << 30


def default_runtime_dir() -> Path:
    """``CORRAL_PG_RUNTIME_DIR``, else ``/dev/shm/corral-pg-UID`` (tmpfs: copies and the
    server's writes stay in memory), else ``$TMPDIR/corral-pg-UID``."""
    if os.environ.get("CORRAL_PG_RUNTIME_DIR"):
        return Path(os.environ["CORRAL_PG_RUNTIME_DIR"])
    name = f"corral-pg-{os.geteuid()}"
    shm = Path("/dev/shm")
    try:
        fs = os.statvfs(shm)
        if os.access(shm, os.W_OK | os.X_OK) and fs.f_bavail * fs.f_frsize >= _MIN_SHM_FREE:
            return shm / name
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / name


def prepare_runtime_dir(path: Path, user: ServerUser) -> Path:
    """Create *path* (or check it) as ours, not a symlink, reachable by the server user."""
    path.mkdir(parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        raise PostgresStartError(
            f"the runtime directory {path} is not a directory owned by uid {os.geteuid()}; "
            "remove it or set CORRAL_PG_RUNTIME_DIR to a private directory"
        )
    # Traverse-only for others when the server runs as another user: it must reach its run
    # directory (0700, its own) but can list nothing here.
    mode = 0o700 if user.is_current else 0o711
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    if not can_traverse(path, user):
        raise PostgresStartError(
            f"the server user {user.name!r} cannot reach {path} (a parent directory is not "
            "searchable by it); set CORRAL_PG_RUNTIME_DIR to a directory under /tmp"
        )
    return path


def write_owner(run_dir: Path, **fields: Any) -> None:
    tmp = run_dir / f"{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(fields))
    os.replace(tmp, run_dir / OWNER_FILE)


def read_owner(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _postmaster_pid(run_dir: Path, owner: dict[str, Any]) -> int | None:
    pid = owner.get("postmaster_pid")
    if isinstance(pid, int):
        return pid
    try:  # the owner died before recording it: the server's own pid file says
        return int((run_dir / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def cleanup_stale_clusters(runtime_dir: Path | None = None) -> list[Path]:
    """Stop the servers of dead owners and remove their directories; returns those removed.

    Only directories of this host whose owner process is gone (pid and start time) count.
    """
    runtime_dir = runtime_dir or default_runtime_dir()
    removed: list[Path] = []
    try:
        entries = list(runtime_dir.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for run_dir in entries:
        if not run_dir.name.startswith("run-") or not run_dir.is_dir():
            continue
        try:
            if _cleanup_one(run_dir, host):
                removed.append(run_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # One odd directory must not stop this start; it is retried next time.
            log.warning("could not check or clean %s: %s", run_dir, exc)
    return removed


def _cleanup_one(run_dir: Path, host: str) -> bool:
    """Clean *run_dir* up if its owner is gone; returns whether it was removed."""
    owner = read_owner(run_dir)
    if owner is None:
        if time.time() - run_dir.stat().st_mtime < _GRACE_SECONDS:
            return False  # may be a start in progress that has not written it yet
    elif owner.get("host") != host or is_alive(int(owner["pid"]), owner.get("pid_start")):
        return False
    postmaster = _postmaster_pid(run_dir, owner or {})
    if postmaster is not None and _is_our_postmaster(postmaster, run_dir):
        log.info("stopping server %d of dead owner %s", postmaster, (owner or {}).get("pid"))
        terminate(postmaster)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("removed stale cluster directory %s", run_dir)
    return True


def _is_our_postmaster(pid: int, run_dir: Path) -> bool:
    """Guard against pid reuse: the process must be a postgres serving *run_dir*'s data."""
    if not is_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: the pid came from this directory's own files
    return str(run_dir / "data").encode() in cmdline


def reachable_binaries(
    binaries: PostgresBinaries, user: ServerUser, runtime_dir: Path
) -> PostgresBinaries:
    """Binaries the server user can execute: as is, or a shared copy of the installation.

    The ``pgserver`` wheel lives in site-packages, often under ``/root`` (mode 0700), which
    the unprivileged server user cannot enter; its installation is copied once (~30 MB).
    """
    if can_traverse(binaries.postgres, user):
        return binaries
    digest = hashlib.sha256(f"{binaries.bindir}\0{binaries.version_string}".encode()).hexdigest()
    target = runtime_dir / f"install-{digest[:16]}"
    # Keep the layout two levels up: the wheel's binaries find their shared libraries
    # through an RPATH of $ORIGIN/../../../pgserver.libs (auditwheel's vendoring).
    base = binaries.install_root.parent.parent
    relative = binaries.install_root.relative_to(base)
    if not (target / ".complete").exists():
        staging = runtime_dir / f"install-{digest[:16]}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o755)
        for part in ("bin", "lib", "share"):
            source = binaries.install_root / part
            if source.is_dir():
                shutil.copytree(source, staging / relative / part, symlinks=True)
        vendored = base / f"{binaries.install_root.parent.name}.libs"
        if vendored.is_dir():
            shutil.copytree(vendored, staging / vendored.name, symlinks=True)
        for root, dirs, _files in os.walk(staging):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        (staging / ".complete").touch()
        try:
            os.rename(staging, target)
        except OSError:  # a concurrent process won the race
            shutil.rmtree(staging, ignore_errors=True)
        log.info("copied %s to %s so user %s can run it", binaries.install_root, target, user.name)
    return PostgresBinaries(
        target / relative / "bin", binaries.version, binaries.version_string, binaries.source
    )
