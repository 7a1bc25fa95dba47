"""Which database a handle reaches, read from its configuration (no connection made).

Handles of one connection kind that reach the same database share the test's one
connection and transaction (``docs/sandbox.md``, "Several handles on one database"). The
target is what libpq (or asyncpg) would connect to: the URL or conninfo, the keyword
arguments over it, then libpq's environment variables for what neither names.

The pytest plugin also records here the server it started, which listens both on
127.0.0.1 and on a Unix socket (:func:`add_socket_route`): asyncpg handles that reach it by
TCP open the sandbox's connections through the faster socket (:func:`asyncpg_socket`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "Target",
    "add_socket_route",
    "asyncpg_socket",
    "remove_socket_route",
    "socket_route",
    "target",
]

#: (host, port, database): a database as a connection would reach it
Target = tuple[str, str, str]

_ALIASES = {"database": "dbname", "username": "user"}

#: TCP port on this machine's loopback -> the Unix socket directory of the same server.
#: Filled only for servers corral started (never a user's server: see add_socket_route).
_SOCKETS: dict[int, str] = {}
#: The host names that reach the loopback address the throwaway server listens on.
_LOOPBACK = frozenset({"127.0.0.1", "localhost"})


def add_socket_route(port: int, directory: str) -> None:
    """Say that the server on ``127.0.0.1:port`` also listens in the Unix socket *directory*.

    Handles that target ``127.0.0.1:port`` (or ``localhost:port``) count as targeting the
    socket (they share a sandbox with handles that use it), and asyncpg sandboxes connect
    through the socket (:func:`asyncpg_socket`). Only for a server whose port nothing else
    can hold while it runs: the pytest plugin's throwaway server, never a user's.
    """
    _SOCKETS[int(port)] = directory


def remove_socket_route(port: int) -> None:
    """Forget :func:`add_socket_route` for *port* (the server stopped)."""
    _SOCKETS.pop(int(port), None)


def socket_route(host: str, port: int | str) -> str | None:
    """The socket directory of the server at *host*:*port*, if corral knows it has one."""
    if not _SOCKETS or host not in _LOOPBACK:
        return None
    try:
        return _SOCKETS.get(int(port))
    except ValueError:
        return None


def _parse(dsn: str) -> dict[str, str] | None:
    """The parts of a URL or a key=value conninfo string; None if it cannot be read."""
    if dsn.startswith(("postgresql://", "postgres://")):
        split = urlsplit(dsn)
        parts = {
            "host": unquote(split.hostname or ""),
            "port": str(split.port or ""),
            "dbname": unquote(split.path.lstrip("/")),
            "user": unquote(split.username or ""),
        }
        parts.update(parse_qsl(split.query))
        return parts
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - asyncpg alone takes URLs only
        return None
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception:
        return None


def target(dsn: str | None, params: Mapping[str, Any] | None = None) -> Target | None:
    """The database *dsn* with *params* over it reaches; None if it cannot be known."""
    parts: dict[str, str] = {}
    if dsn:
        parsed = _parse(dsn)
        if parsed is None:
            return None
        parts.update(parsed)
    for key, value in (params or {}).items():
        if value is not None and not callable(value):
            parts[_ALIASES.get(key, key)] = str(value)
    parts = {_ALIASES.get(k, k): v for k, v in parts.items() if v}
    env = os.environ
    host = parts.get("host") or parts.get("hostaddr") or env.get("PGHOST", "")
    port = parts.get("port") or env.get("PGPORT") or "5432"
    host = socket_route(host, port) or host  # the same server either way
    user = parts.get("user") or env.get("PGUSER") or _os_user()
    dbname = parts.get("dbname") or env.get("PGDATABASE") or user
    return (host, port, dbname)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name at all: nothing to default the database to
        return ""


def asyncpg_socket(dsn: str | None, params: Mapping[str, Any]) -> tuple[str, int] | None:
    """The socket directory and port to use for an asyncpg connection made with *dsn* and
    keyword arguments *params*, when those reach a server of :func:`add_socket_route` by
    TCP; None: connect as configured.

    asyncpg's own order decides the host (unlike libpq, a URL's host beats the ``host`` of
    its query): the ``host`` argument, the URL's host, its query's ``host``, ``PGHOST``.
    Anything corral does not follow (several hosts, a service file) is left alone.
    """
    if not _SOCKETS:
        return None
    host, port = params.get("host"), params.get("port")
    if dsn:
        split = urlsplit(dsn)
        query = dict(parse_qsl(split.query))
        if "service" in query:
            return None
        hostspec = split.netloc.rpartition("@")[2]
        if not host and hostspec:
            if "," in hostspec:
                return None
            try:
                host = unquote(split.hostname or "")
                port = port or split.port
            except ValueError:
                return None
        if not host:
            host = query.get("host")
            port = port or query.get("port")
    host = host or os.environ.get("PGHOST")
    if not isinstance(host, str) or "," in host:
        return None
    port = port or os.environ.get("PGPORT") or 5432
    if not isinstance(port, (int, str)):
        return None  # a list of ports: several hosts
    directory = socket_route(host, port)
    return None if directory is None else (directory, int(port))
