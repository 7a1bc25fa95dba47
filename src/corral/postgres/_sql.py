"""SQL plumbing for templates and clones: lazy psycopg, admin connections, DSN rewriting."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from corral.errors import PostgresDriverMissing

if TYPE_CHECKING:
    import psycopg

_URL = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)


def psycopg_module() -> Any:
    """Import psycopg 3 on first use, with an error that says how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresDriverMissing(
            "template databases and clones need psycopg 3: pip install 'corral[psycopg]'"
        ) from exc
    return psycopg


def connect(dsn: str, *, connect_timeout: int = 10) -> psycopg.Connection[Any]:
    """An autocommit connection (CREATE/DROP DATABASE cannot run in a transaction)."""
    module = psycopg_module()
    conn: psycopg.Connection[Any] = module.connect(
        dsn, autocommit=True, connect_timeout=connect_timeout
    )
    return conn


def ident(name: str) -> Any:
    """A safely quoted identifier for :mod:`psycopg.sql` composition."""
    return psycopg_module().sql.Identifier(name)


def sql(text: str) -> Any:
    return psycopg_module().sql.SQL(text)


def database_dsn(admin_dsn: str, name: str) -> str:
    """*admin_dsn* pointing at database *name* instead (URL or ``key=value`` form).

    Everything else (host, port, user, options) is kept. A ``+driver`` URL scheme such as
    SQLAlchemy's ``postgresql+psycopg://`` is kept too.

    :param admin_dsn: a DSN of the server.
    :param name: the database to point at.
    """
    if _URL.match(admin_dsn):
        parts = urlsplit(admin_dsn)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(key == "dbname" for key, _ in query):
            query = [(k, name if k == "dbname" else v) for k, v in query]
            new_query = urlencode(query, safe="/", quote_via=quote)
            return urlunsplit((parts.scheme, parts.netloc, parts.path, new_query, parts.fragment))
        return urlunsplit(
            (parts.scheme, parts.netloc, "/" + quote(name, safe=""), parts.query, parts.fragment)
        )
    conninfo = psycopg_module().conninfo
    params = conninfo.conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    result: str = conninfo.make_conninfo(**params)
    return result
