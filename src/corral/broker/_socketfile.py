"""The broker's socket file: private placement, safe replacement of stale sockets, removal."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import tempfile
from typing import Final

from corral.errors import BrokerAlreadyRunning, BrokerError

__all__ = ["MAX_UNIX_PATH", "bind_at", "bind_private", "cleanup_files", "is_alive"]

log = logging.getLogger("corral.broker")

MAX_UNIX_PATH: Final = 104  # macOS sun_path; Linux allows 108


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


def bind_private(sock: socket.socket) -> tuple[str, int, str]:
    """Bind *sock* under a random name in a fresh 0700 directory; socket mode 0600.

    :returns: ``(path, inode, directory)``.
    """
    base = tempfile.gettempdir()
    if len(base) > MAX_UNIX_PATH - 40:  # e.g. macOS' long $TMPDIR
        base = "/tmp"
    directory = tempfile.mkdtemp(prefix="corral-", dir=base)  # mode 0700
    path = os.path.join(directory, f"broker-{secrets.token_hex(6)}.sock")
    sock.bind(path)
    os.chmod(path, 0o600)
    return path, os.lstat(path).st_ino, directory


def bind_at(sock: socket.socket, path: str) -> tuple[str, int]:
    """Bind *sock* at *path* (mode 0600), replacing a stale socket, never a live one.

    :returns: ``(path, inode)``.
    :raises BrokerAlreadyRunning: a broker answers at *path*.
    :raises BrokerError: *path* is too long, or exists and is not a socket.
    """
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
