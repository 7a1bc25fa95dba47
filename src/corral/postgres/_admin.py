"""Admin connections (templates, clones, drops) on whichever driver is installed.

psycopg 3 when it is there; else asyncpg, driven on a private event loop (admin work is a
few statements, not the sandbox), so an app with only asyncpg needs no second driver.
Statements are plain text with ``%s`` placeholders; database errors come out as
:class:`AdminError` carrying the SQLSTATE, whatever the driver.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from corral.errors import AdminError, PostgresDriverMissing

__all__ = [
    "AdminConnection",
    "AdminError",
    "admin",
    "conninfo_params",
    "quote_ident",
    "quote_literal",
]

_T = TypeVar("_T")

#: SQLSTATEs the admin code tells apart.
LOCK_NOT_AVAILABLE = "55P03"
OBJECT_IN_USE = "55006"
INVALID_CATALOG_NAME = "3D000"
DUPLICATE_DATABASE = "42P04"


def quote_ident(name: str) -> str:
    """*name* as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """*value* as a SQL string literal (``standard_conforming_strings`` is on since 9.1)."""
    if "\0" in value:
        raise ValueError("a SQL string cannot hold a NUL character")
    return "'" + value.replace("'", "''") + "'"


class AdminConnection:
    """An autocommit connection for admin statements; a context manager that closes it."""

    server_version: int

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (none for a statement without a result)."""
        raise NotImplementedError

    def script(self, text: str) -> None:
        """Run a script of many statements (its own BEGIN/COMMIT allowed), like psql -f."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Psycopg(AdminConnection):
    def __init__(self, module: Any, dsn: str, connect_timeout: int) -> None:
        self._errors = module.Error
        self._conn = module.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
        self.server_version = int(self._conn.info.server_version)

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            cursor = self._conn.execute(query, list(params) if params else None)
            return list(cursor.fetchall()) if cursor.description is not None else []
        except self._errors as exc:
            raise AdminError(exc) from exc

    def script(self, text: str) -> None:
        try:
            # No parameters: psycopg sends the text as one simple query.
            self._conn.execute(text.encode())
        except self._errors as exc:
            raise AdminError(exc) from exc

    def close(self) -> None:
        self._conn.close()


_PLACEHOLDER = re.compile(r"%s")


class _Asyncpg(AdminConnection):
    """asyncpg on a loop of its own: in the calling thread, or, where that thread runs a
    loop already (an admin call from async code), in a helper thread per call."""

    def __init__(self, module: Any, dsn: str, connect_timeout: int) -> None:
        self._errors = (module.PostgresError, module.InterfaceError)
        self._loop = asyncio.new_event_loop()
        try:
            # Connection failures stay the driver's own, as psycopg's do.
            self._conn = self._run(module.connect(dsn, timeout=connect_timeout), wrap=False)
        except BaseException:
            self._loop.close()
            raise
        version = self._conn.get_server_version()
        self.server_version = int(version.major) * 10000 + int(version.minor)

    def _run(self, coro: Coroutine[Any, Any, _T], *, wrap: bool = True) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            try:
                return self._loop.run_until_complete(coro)
            except self._errors as exc:
                if not wrap:
                    raise
                raise AdminError(exc) from exc
        result: list[_T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(self._run(coro, wrap=wrap))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=run, name="corral-admin")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    @property
    def closed(self) -> bool:
        return bool(self._conn.is_closed())

    def execute(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        numbered = iter(range(1, len(params) + 1))
        query = _PLACEHOLDER.sub(lambda _: f"${next(numbered)}", query)
        rows = self._run(self._conn.fetch(query, *params))
        return [tuple(row) for row in rows]

    def script(self, text: str) -> None:
        self._run(self._conn.execute(text))  # no arguments: the simple query protocol

    def close(self) -> None:
        try:
            if not self._conn.is_closed():
                self._run(self._conn.close())
        finally:
            self._loop.close()


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def admin(dsn: str, *, connect_timeout: int = 10) -> AdminConnection:
    """An autocommit admin connection to *dsn*: psycopg 3, else asyncpg.

    :raises PostgresDriverMissing: neither is installed (or *dsn* is a ``key=value`` DSN,
        which asyncpg does not read).
    :raises AdminError: the connection failed.
    """
    psycopg = _import("psycopg")
    if psycopg is not None:
        return _Psycopg(psycopg, dsn, connect_timeout)
    asyncpg = _import("asyncpg")
    if asyncpg is None:
        raise PostgresDriverMissing(
            "template databases and clones need psycopg 3 or asyncpg: "
            "pip install 'corral[psycopg]' (or 'corral[asyncpg]')"
        )
    if not re.match(r"^postgres(?:ql)?(?:\+\w+)?://", dsn, re.IGNORECASE):
        raise PostgresDriverMissing(
            f"with asyncpg alone, corral needs the database as a postgresql:// URL, not "
            f"{dsn!r}: give a URL, or pip install 'corral[psycopg]'"
        )
    url = re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", dsn, flags=re.IGNORECASE)
    return _Asyncpg(asyncpg, url, connect_timeout)


def conninfo_params(dsn: str) -> dict[str, str]:
    """The connection parameters of *dsn* (URL or ``key=value``), libpq's names.

    psycopg parses it when installed; else a URL is read here (asyncpg's only form).
    """
    psycopg = _import("psycopg")
    if psycopg is not None:
        from psycopg.conninfo import conninfo_to_dict

        return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    parts = urlsplit(dsn)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    found = {
        "host": unquote(parts.hostname or ""),
        "port": str(parts.port or ""),
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "dbname": unquote(parts.path.lstrip("/")),
    }
    return {k: v for k, v in {**found, **params}.items() if v}
