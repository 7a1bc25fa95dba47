"""The broker's socket file: private placement, safe replacement of stale sockets, removal."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import tempfile
from typing import Final

__all__ = [
    "BACKLOG",
    "MAX_UNIX_PATH",
    "bind_at",
    "bind_private",
    "cleanup_files",
    "is_alive",
    "remove_stale_directories",
]

log = logging.getLogger("corral.broker")

MAX_UNIX_PATH: Final = 104  # macOS sun_path; Linux allows 108

#: Connections the kernel queues before the broker accepts them (capped by somaxconn).
#: A full backlog makes connect() fail with EAGAIN; the clients retry until their timeout.
BACKLOG: Final = 4096

# A private directory names its owner: corral-<pid>-<random>.
_PRIVATE_DIR = re.compile(r"corral-([0-9]+)-[^/]+\Z")


def is_alive(path: str) -> bool:
    """Does something accept connections at *path*? (A stale socket refuses.)"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog is a live broker: never unlink it
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def cleanup_files(path: str, inode: int, private_dir: str | None) -> None:
    """Remove our socket (only if it is still ours) and our private directory."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    if private_dir is not None:
        with contextlib.suppress(OSError):
            os.rmdir(private_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def remove_stale_directories(base: str) -> list[str]:
    """Remove the private directories of brokers that died without cleaning up (kill -9).

    Only what can be proven dead goes: a ``corral-<pid>-*`` directory of ours whose
    owner pid is gone, holding nothing but ``broker-*.sock`` sockets nobody listens on.
    Another run's live broker is never touched (its pid lives, and it accepts); neither
    is a directory with anything else in it, nor one named the old way (no pid).

    :returns: the directories removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.getuid()
    me = os.getpid()
    for name in names:
        match = _PRIVATE_DIR.match(name)
        if match is None:
            continue
        pid = int(match[1])
        if pid == me or _pid_alive(pid):
            continue
        directory = os.path.join(base, name)
        sockets = _dead_sockets(directory, uid)
        if sockets is None:
            continue
        for path in sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        try:
            os.rmdir(directory)
        except OSError:
            continue
        log.info("removed %s, left by broker pid %d that died without stopping", directory, pid)
        removed.append(directory)
    return removed


def _dead_sockets(directory: str, uid: int) -> list[str] | None:
    """The sockets in *directory* if all of it is provably a dead broker's, else None."""
    try:
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            return None
        entries = os.listdir(directory)
    except OSError:
        return None
    sockets = []
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            est = os.lstat(path)
        except OSError:
            return None
        if not (
            entry.startswith("broker-")
            and entry.endswith(".sock")
            and stat.S_ISSOCK(est.st_mode)
            and est.st_uid == uid
        ):
            return None
        if is_alive(path):
            return None
        sockets.append(path)
    return sockets


def bind_private(sock: socket.socket) -> tuple[str, int, str]:
    """Bind *sock* under a random name in a fresh 0700 directory; socket mode 0600.

    The directory is ``corral-<pid>-<random>``; directories left by brokers that were
    killed (``remove_stale_directories``) are removed first.

    :returns: ``(path, inode, directory)``.
    """
    base = tempfile.gettempdir()
    if len(base) > MAX_UNIX_PATH - 40:  # e.g. macOS' long $TMPDIR
        base = "/tmp"
    remove_stale_directories(base)
    # mode 0700
    directory = tempfile.mkdtemp(prefix=f"corral-{os.getpid()}-", dir=base)
    # os.urandom, as secrets.token_hex does: secrets would pull in hashlib and hmac.
    path = os.path.join(directory, f"broker-{os.urandom(6).hex()}.sock")
    sock.bind(path)
    os.chmod(path, 0o600)
    return path, os.lstat(path).st_ino, directory


def bind_at(sock: socket.socket, path: str) -> tuple[str, int]:
    """Bind *sock* at *path* (mode 0600), replacing a stale socket, never a live one.

    :returns: ``(path, inode)``.
    :raises BrokerAlreadyRunning: a broker answers at *path*.
    :raises BrokerError: *path* is too long, or exists and is not a socket.
    """
    # Here, not at the top: the plugin's lazy broker binds with bind_private alone, and
    # a run without a database imports no more than it needs.
    from corral.errors import BrokerAlreadyRunning, BrokerError

    if len(path.encode()) >= MAX_UNIX_PATH:
        raise BrokerError(
            f"socket path is {len(path.encode())} bytes; Unix sockets allow about "
            f"{MAX_UNIX_PATH}: choose a shorter socket_path"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BrokerError(f"{path} exists and is not a socket; refusing to replace it")
        if is_alive(path):
            raise BrokerAlreadyRunning(
                f"a broker is already running at {path}; stop it or use another socket_path"
            )
        log.warning("replacing stale broker socket %s (nothing answers there)", path)
    # Bind under a private name and rename into place: the socket is never reachable
    # with the umask's permissions, and the rename replaces a stale socket atomically.
    staging = tempfile.mkdtemp(prefix=".corral-", dir=os.path.dirname(path))
    try:
        tmp = os.path.join(staging, "s")
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(staging, "s"))
        os.rmdir(staging)
    return path, os.lstat(path).st_ino
