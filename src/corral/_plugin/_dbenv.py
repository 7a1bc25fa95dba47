"""The environment variables a test process's database URL is handed out under.

Each ``corral_database_env`` entry is ``NAME`` (the whole URL) or ``NAME=<template>``,
where the template holds ``{part}`` fields (``url``, ``host``, ``port``, ``user``,
``password``, ``dbname``, ``sqlalchemy_url``, ``asyncpg_url``), so an app that builds its
URL from parts (``POSTGRES_SERVER={host}``) gets them without a line of code changed.
The libpq variables (``PGHOST``...) are set too. Pure: parse once, render per database.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from corral._plugin._envnames import ENV_SANDBOX_MODE, URL_VARIABLE

__all__ = [
    "ENV_SANDBOX_MODE",
    "LIBPQ_VARIABLES",
    "PARTS",
    "URL_VARIABLE",
    "EnvEntry",
    "EnvEntryError",
    "parse_entries",
    "parse_entry",
    "process_env",
    "render",
    "url_parts",
]


#: Every ``{part}`` an entry may name, with what it holds.
PARTS: Mapping[str, str] = {
    "url": "the whole URL (postgresql://user:password@host:port/dbname), as NAME alone gets",
    "host": "the URL's host name or address (a socket directory only if the URL has no host)",
    "port": "the server's port",
    "user": "the user name",
    "password": "the password (empty when there is none)",
    "dbname": "the database's name",
    "sqlalchemy_url": "the URL with SQLAlchemy's psycopg driver (postgresql+psycopg://...)",
    "asyncpg_url": "the URL for SQLAlchemy's asyncpg driver (postgresql+asyncpg://...)",
}

#: libpq's variables and the part each gets: apps and tools relying on libpq's defaults
#: (psql, pg_dump, psycopg.connect("")) reach the test process's database.
LIBPQ_VARIABLES: Mapping[str, str] = {
    "PGHOST": "host",
    "PGPORT": "port",
    "PGUSER": "user",
    "PGDATABASE": "dbname",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: libpq's key=value form: keys, '=', values bare or single-quoted with \-escapes.
_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'")
_BARE = re.compile(r"(?:[^\s\\]|\\.)*")


class EnvEntryError(ValueError):
    """A ``corral_database_env`` entry that cannot be used (the message says why)."""


@dataclass(frozen=True)
class EnvEntry:
    """One ``corral_database_env`` entry: a variable and what it gets."""

    name: str
    template: str = "{url}"

    def render(self, parts: Mapping[str, str]) -> str:
        return self.template.format_map(parts)


def parse_entry(text: str) -> EnvEntry:
    """``NAME`` or ``NAME=<template with {part} fields>``.

    :raises EnvEntryError: not a variable name, or a field that is not a part.
    """
    name, sep, template = text.partition("=")
    name = name.strip()
    if not _NAME.match(name):
        raise EnvEntryError(
            f"{name!r} is not an environment variable name (entry {text!r}); "
            "write NAME or NAME={part}"
        )
    if not sep:
        return EnvEntry(name)
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
        bad_form = any(spec or conv for _, f, spec, conv in string.Formatter().parse(template) if f)
    except ValueError as exc:  # unbalanced braces
        raise EnvEntryError(f"{text!r}: {exc} (write literal braces as {{{{ and }}}})") from None
    unknown = [f for f in fields if f not in PARTS]
    if unknown or bad_form or not template:
        valid = ", ".join("{" + p + "}" for p in PARTS)
        what = f"unknown part {{{unknown[0]}}}" if unknown else "a value like NAME={part}"
        raise EnvEntryError(f"{text!r}: {what}; the parts are {valid}")
    return EnvEntry(name, template)


def parse_entries(texts: Iterable[str]) -> tuple[EnvEntry, ...]:
    """Every entry parsed; a variable named twice is an error too."""
    entries = tuple(parse_entry(t) for t in texts)
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise EnvEntryError(f"{entry.name} is named twice")
        seen.add(entry.name)
    return entries


def _conninfo(dsn: str) -> dict[str, str]:
    """libpq's ``key=value`` form parsed (quoted values, backslash escapes)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(dsn):
        if not dsn[pos:].strip():
            break
        key = _KEYWORD.match(dsn, pos)
        if key is None:
            raise ValueError(f"not a libpq connection string: {dsn!r}")
        pos = key.end()
        quoted = _QUOTED.match(dsn, pos)
        match = quoted or _BARE.match(dsn, pos)
        assert match is not None  # _BARE matches the empty string
        raw = match.group(1) if quoted else match.group(0)
        params[key.group(1)] = re.sub(r"\\(.)", r"\1", raw)
        pos = match.end()
    return params


def _hosts(hostlist: str) -> tuple[list[str], list[str]]:
    """``h1:5432,[::1]:5433`` (a URL's host list) as hosts and ports ('' where not given)."""
    hosts: list[str] = []
    ports: list[str] = []
    for item in hostlist.split(",") if hostlist else []:
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        hosts.append(unquote(host))
        ports.append(port)
    return hosts, ports


def _from_url(dsn: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """A URL's connection parameters as libpq takes them (query parameters win), its other
    query parameters, and the host a URL parser sees (the URL's own)."""
    split = urlsplit(dsn)
    userinfo, _, hostlist = split.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    hosts, ports = _hosts(hostlist)
    params = {
        "host": ",".join(hosts),
        "port": ",".join(ports) if any(ports) else "",
        "user": unquote(user),
        "password": unquote(password),
        "dbname": unquote(split.path.lstrip("/")),
    }
    seen = {"host": params["host"]}
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    for key in list(params):
        if query.get(key):
            params[key] = query.pop(key)
    return params, query, seen


def _to_url(params: Mapping[str, str], query: Mapping[str, str]) -> str:
    """A ``postgresql://`` URL of libpq parameters (socket directories in the query)."""
    user, password = params.get("user", ""), params.get("password", "")
    netloc = quote(user, safe="") if user else ""
    if password:
        netloc += ":" + quote(password, safe="")
    if netloc:
        netloc += "@"
    hosts = params["host"].split(",") if params.get("host") else []
    ports = params["port"].split(",") if params.get("port") else []
    if len(ports) == 1:
        ports *= max(1, len(hosts))  # libpq: one port serves every host
    tail = dict(query)
    if any(h.startswith("/") for h in hosts):
        # A socket directory cannot stand in the URL's host: it goes into the query, where
        # libpq, psycopg, asyncpg and SQLAlchemy all read it (with the port, which names
        # the socket file).
        tail = {"host": ",".join(hosts), "port": ",".join(ports), **tail}
    else:
        ports += [""] * (len(hosts) - len(ports))
        netloc += ",".join(
            (f"[{h}]" if ":" in h else quote(h, safe="")) + (f":{p}" if p else "")
            for h, p in zip(hosts, ports, strict=False)
        )
    url = f"postgresql://{netloc}/{quote(params.get('dbname', ''), safe='')}"
    query_text = urlencode({k: v for k, v in tail.items() if v}, safe="/,", quote_via=quote)
    return f"{url}?{query_text}" if query_text else url


def _ports(port: str) -> str:
    """libpq's port list with its default filled in: ``""`` -> ``"5432"``."""
    return ",".join(p or "5432" for p in port.split(",")) if port else "5432"


def _parts(dsn: str) -> tuple[dict[str, str], dict[str, str]]:
    """:func:`url_parts`, and the host and port libpq connects to (``PGHOST``/``PGPORT``)."""
    if _URL.match(dsn):
        params, query, seen = _from_url(dsn)
        url = dsn
    else:
        params = _conninfo(dsn)
        keys = ("host", "port", "user", "password", "dbname")
        query = {k: v for k, v in params.items() if k not in keys}
        url = _to_url(params, query)
        seen = {}
    libpq = {"host": params.get("host", ""), "port": _ports(params.get("port", ""))}
    # A URL with a host of its own and a socket directory in the query (corral's throwaway
    # server): parts are for apps that build a URL, so they get what a URL parser sees.
    # The port is libpq's either way (a query's port overrides the URL's for libpq too).
    shown = {**libpq, "host": seen["host"]} if seen.get("host") else libpq
    rest = url[url.index("://") :]
    parts = {
        "url": url,
        **shown,
        "user": params.get("user", ""),
        "password": params.get("password", ""),
        "dbname": params.get("dbname", ""),
        "sqlalchemy_url": "postgresql+psycopg" + rest,
        "asyncpg_url": "postgresql+asyncpg" + rest,
    }
    return parts, libpq


def url_parts(dsn: str) -> dict[str, str]:
    """Every part of *dsn* (a ``postgresql://`` URL or libpq ``key=value`` string).

    The ``url`` part is *dsn* itself when it is a URL (what ``CORRAL_DATABASE_URL``
    holds), else the ``key=value`` string as a URL. A missing port is libpq's default,
    5432. Several hosts (libpq's fail-over lists) give comma-separated hosts and ports,
    as libpq's ``PGHOST`` and ``PGPORT`` take them. ``host`` and ``port`` are the URL's
    own when it has a host (``...@127.0.0.1:PORT/db?host=/socket/dir`` gives
    ``127.0.0.1``: apps build URLs from them), else the query's (a socket directory).
    """
    return _parts(dsn)[0]


def render(dsn: str, entries: Iterable[EnvEntry], *, libpq: bool = True) -> dict[str, str]:
    """The variables to set for a process whose database is *dsn*.

    :param entries: the parsed ``corral_database_env`` entries.
    :param libpq: whether to add ``PGHOST``, ``PGPORT``, ``PGUSER`` and ``PGDATABASE``
        (and ``PGPASSWORD`` when the URL carries a password); ``PGHOST`` and ``PGPORT`` are
        where libpq connects (a socket directory in the URL's query wins, as in libpq).
    """
    parts, connects_to = _parts(dsn)
    env: dict[str, str] = {}
    if libpq:
        # libpq's variables get what libpq itself connects to: the socket directory of a
        # URL that has one in its query (libpq takes a directory in PGHOST; so does asyncpg).
        values = {**parts, **connects_to}
        env.update({name: values[part] for name, part in LIBPQ_VARIABLES.items() if values[part]})
        if parts["password"]:
            env["PGPASSWORD"] = parts["password"]
    for entry in entries:
        env[entry.name] = entry.render(parts)
    return env


def process_env(dsn: str, entry_texts: Iterable[str]) -> dict[str, str]:
    """Everything a process whose database is *dsn* gets: :data:`URL_VARIABLE` first, then
    the ``corral_database_env`` entries (raw texts) and libpq's variables (:func:`render`).

    :raises EnvEntryError: an entry is malformed (the settings reject those first).
    """
    return {URL_VARIABLE: dsn, **render(dsn, parse_entries(entry_texts))}
