"""Which database a handle reaches, read from its configuration (no connection made).

Handles of one connection kind that reach the same database share the test's one
connection and transaction (``docs/sandbox.md``, "Several handles on one database"). The
target is what libpq (or asyncpg) would connect to: the URL or conninfo, the keyword
arguments over it, then libpq's environment variables for what neither names.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Target", "target"]

#: (host, port, database): a database as a connection would reach it
Target = tuple[str, str, str]

_ALIASES = {"database": "dbname", "username": "user"}


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
    user = parts.get("user") or env.get("PGUSER") or _os_user()
    dbname = parts.get("dbname") or env.get("PGDATABASE") or user
    return (host, port, dbname)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name at all: nothing to default the database to
        return ""
