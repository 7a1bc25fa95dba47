"""Who the server runs as: the current user, or (when we are root) an unprivileged one.

``initdb`` and ``postgres`` refuse to run as root, and CI runs as root; so as root the
server runs as ``CORRAL_PG_USER``, else ``postgres``, else a dedicated system user
``corral-postgres`` created on first use. Files it needs must be reachable by that user.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import PostgresStartError

log = logging.getLogger("corral.postgres")

DEDICATED_USER = "corral-postgres"


@dataclass(frozen=True)
class ServerUser:
    """The operating-system account the server processes run as."""

    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()

    def popen_kwargs(self) -> dict[str, Any]:
        """Extra :class:`subprocess.Popen` arguments that drop to this user (none if current)."""
        if self.is_current:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if not self.is_current:
            os.chown(path, self.uid, self.gid)


def _from_pwd(entry: pwd.struct_passwd) -> ServerUser:
    return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _lookup(name: str) -> ServerUser | None:
    try:
        return _from_pwd(pwd.getpwnam(name))
    except KeyError:
        return None


def _create_dedicated_user() -> ServerUser:
    commands = []
    if shutil.which("useradd"):
        commands.append(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
             "/nonexistent", "--shell", "/usr/sbin/nologin", DEDICATED_USER]
        )  # fmt: skip
    if shutil.which("adduser"):  # BusyBox / Alpine
        commands.append(["adduser", "-S", "-D", "-H", DEDICATED_USER])
    errors = []
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        user = _lookup(DEDICATED_USER)  # may also exist because a concurrent process made it
        if user is not None:
            log.info("created system user %s to run PostgreSQL as", DEDICATED_USER)
            return user
        errors.append(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    raise PostgresStartError(
        "running as root, and PostgreSQL refuses to run as root; there is no `postgres` user "
        f"and creating {DEDICATED_USER!r} failed ({'; '.join(errors) or 'no useradd/adduser'}). "
        "Create an unprivileged user and set CORRAL_PG_USER to its name."
    )


def resolve_server_user(name: str | None = None) -> ServerUser:
    """The user to run the server as.

    :param name: an explicit user name (default: ``CORRAL_PG_USER``; only honoured as root,
        since only root can switch users).
    :raises PostgresStartError: as root, when no unprivileged user exists or can be made.
    """
    if os.geteuid() != 0:
        return _from_pwd(pwd.getpwuid(os.geteuid()))
    name = name or os.environ.get("CORRAL_PG_USER") or None
    if name is not None:
        user = _lookup(name)
        if user is None:
            raise PostgresStartError(f"the server user {name!r} (CORRAL_PG_USER) does not exist")
        if user.uid == 0:
            raise PostgresStartError(f"the server user {name!r} is root; PostgreSQL refuses that")
        return user
    return _lookup("postgres") or _lookup(DEDICATED_USER) or _create_dedicated_user()


def can_traverse(path: Path, user: ServerUser) -> bool:
    """Whether *user* can reach *path* (execute permission on every directory above it).

    Group membership beyond the primary group is ignored, which errs on the safe side.
    """
    if user.is_current or user.uid == 0:
        return True
    for directory in [path, *path.parents]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True
