"""Template databases: build once from a schema source, name by its hash, reuse while unchanged.

The build runs under a PostgreSQL advisory lock keyed by the template's name, so concurrent
callers (xdist workers, parallel CI jobs on one server) build it once and the rest wait.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from corral.errors import EmptyTemplate, TemplateBuildError
from corral.postgres._admin import (
    LOCK_NOT_AVAILABLE,
    AdminError,
    admin,
    quote_ident,
    quote_literal,
)
from corral.postgres._databases import (
    drop_database,
    make_mark,
    set_mark,
    template_ready,
)
from corral.postgres._sql import database_dsn

log = logging.getLogger("corral.postgres")

PathLike: TypeAlias = "str | os.PathLike[str]"
#: SQL files or directories of them (run in order), or a callable ``fn(dsn)`` (migrations).
SchemaSource: TypeAlias = "PathLike | Sequence[PathLike] | Callable[[str], object]"

TEMPLATE_PREFIX = "corral_tpl_"
_HASH_VERSION = b"corral-template-v1\0"

#: What a schema step can create, counted before and after it in user schemas (not
#: pg_catalog, information_schema, TOAST or temporary ones): relations (tables, views,
#: sequences, foreign tables...), routines, types, schemas and extensions. One query.
_CREATED_QUERY = """
WITH user_ns AS (
    SELECT oid FROM pg_catalog.pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema')
      AND nspname NOT LIKE 'pg\\_toast%' AND nspname NOT LIKE 'pg\\_temp\\_%'
)
SELECT
    (SELECT count(*) FROM pg_catalog.pg_class
      WHERE relnamespace IN (SELECT oid FROM user_ns)
        AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')),
    (SELECT count(*) FROM pg_catalog.pg_proc WHERE pronamespace IN (SELECT oid FROM user_ns)),
    (SELECT count(*) FROM pg_catalog.pg_type WHERE typnamespace IN (SELECT oid FROM user_ns)),
    (SELECT count(*) FROM user_ns),
    (SELECT count(*) FROM pg_catalog.pg_extension)
"""


def _sql_files(schema: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [schema] if isinstance(schema, str | os.PathLike) else list(schema)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix == ".sql" and p.is_file()))
        else:
            files.append(path)
    return files


def _hash_paths(digest: Any, paths: Iterable[PathLike]) -> None:
    for item in paths:
        root = Path(item)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root) if root.is_dir() else path.name).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")


def schema_hash(schema: SchemaSource, *, watch: Iterable[PathLike] = ()) -> str:
    """The hex SHA-256 that names a schema's template.

    SQL files: their names and contents, in order. A callable: its qualified name and the
    source of its whole module (so an edited helper in the same file counts). *watch* adds
    files or directories (recursively) whose contents must also trigger a rebuild — e.g.
    Alembic's ``versions/`` directory for a callable that runs ``alembic upgrade head``.
    """
    if callable(schema):
        source: bytes | None = None
        try:
            source_file = inspect.getsourcefile(schema)
        except TypeError:
            source_file = None
        if source_file and os.path.exists(source_file):
            source = Path(source_file).read_bytes()
        else:
            try:
                source = inspect.getsource(schema).encode()
            except (OSError, TypeError):
                log.warning("no source for %r: pass watch=[...] so changes rebuild", schema)
        return function_hash(schema.__module__, schema.__qualname__, source, watch=watch)
    digest = hashlib.sha256(_HASH_VERSION)
    files = _sql_files(schema)
    if not files:
        raise ValueError(f"the schema {schema!r} names no SQL files")
    _hash_paths(digest, files)
    _hash_paths(digest, watch)
    return digest.hexdigest()


def function_hash(
    module: str, qualname: str, source: bytes | None, *, watch: Iterable[PathLike] = ()
) -> str:
    """:func:`schema_hash` of a function known by name and module source, not imported.

    The pytest plugin runs a ``module:function`` schema in a child process and never
    imports it itself; it names the template from the module's file with this.
    """
    digest = hashlib.sha256(_HASH_VERSION)
    digest.update(f"callable:{module}.{qualname}\0".encode())
    if source is not None:
        digest.update(source)
    _hash_paths(digest, watch)
    return digest.hexdigest()


def template_name(schema: SchemaSource, *, watch: Iterable[PathLike] = ()) -> str:
    """``corral_tpl_`` + the first 24 hex digits of :func:`schema_hash`."""
    return TEMPLATE_PREFIX + schema_hash(schema, watch=watch)[:24]


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _describe(schema: SchemaSource) -> str:
    if callable(schema):
        return f"{schema.__module__}.{schema.__qualname__}"
    return ", ".join(str(p) for p in _sql_files(schema))


def _build(schema: SchemaSource, dsn: str, template: str) -> None:
    """Run the schema against *dsn*; failures become :class:`TemplateBuildError`."""
    if callable(schema):
        try:
            schema(dsn)
        except Exception as exc:
            raise TemplateBuildError(
                f"building template {template!r}: the schema callable {_describe(schema)} "
                f"raised {type(exc).__name__}: {exc}",
                template=template,
                source=_describe(schema),
            ) from exc
        return
    with admin(dsn) as conn:
        for path in _sql_files(schema):
            try:
                text = path.read_text()
            except OSError as exc:
                raise TemplateBuildError(
                    f"building template {template!r}: cannot read schema file {path}: {exc}",
                    template=template,
                    source=str(path),
                ) from exc
            try:
                # As one simple query, so a file may hold many statements (and its own
                # BEGIN/COMMIT), like psql -f.
                conn.script(text)
            except AdminError as exc:
                raise TemplateBuildError(
                    f"building template {template!r}: schema file {path} failed: {exc.kind}: {exc}",
                    template=template,
                    source=str(path),
                ) from exc.__cause__


def ensure_template(
    admin_dsn: str,
    schema: SchemaSource,
    *,
    watch: Iterable[PathLike] = (),
    name: str | None = None,
    base_template: str = "template1",
    lock_timeout: float = 600.0,
    require_objects: bool = False,
    encoding: str | None = None,
) -> str:
    """Build the template database for *schema* unless it exists; returns its name.

    The database is created, filled by *schema*, then marked ``IS_TEMPLATE`` with
    ``ALLOW_CONNECTIONS false`` (so no session can block a clone). A failed build drops
    it again. A half-built template left by a killed builder is dropped and rebuilt.

    :param admin_dsn: a superuser DSN of the server.
    :param schema: SQL file paths (or directories of ``*.sql``, run in name order), or a
        callable ``fn(dsn)`` that migrates the database at *dsn* (Alembic, Django, ...).
    :param watch: more files/directories that feed the hash (see :func:`schema_hash`).
    :param name: use this template name instead of the hash-derived one.
    :param base_template: what the template itself is created from.
    :param lock_timeout: seconds to wait for a concurrent builder of the same template.
    :param require_objects: fail when the schema created nothing (no relation, routine,
        type, schema or extension): a migration that ran against another database.
    :param encoding: the template's ``ENCODING`` (default: the base template's).
    :raises TemplateBuildError: the schema failed; ``__cause__`` is the original error.
    :raises EmptyTemplate: *require_objects* and the schema created nothing; the
        template was dropped.
    """
    name = name or template_name(schema, watch=watch)
    with admin(admin_dsn) as conn:
        conn.execute(f"SET lock_timeout = {int(lock_timeout * 1000)}")
        started = time.perf_counter()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", [_lock_key(name)])
        except AdminError as exc:
            if exc.sqlstate != LOCK_NOT_AVAILABLE:
                raise
            raise TemplateBuildError(
                f"waited {lock_timeout:g} s for another process building template {name!r}",
                template=name,
                source=_describe(schema),
            ) from exc
        conn.execute("SET lock_timeout = 0")
        try:
            ready = template_ready(conn, name)
            if ready is not None:
                if ready:
                    log.debug("template %s exists; reusing it", name)
                    return name
                # Under the lock, a database that is not a finished template can only be a
                # build whose process died: throw it away.
                log.warning("dropping half-built template %s left by a killed build", name)
                drop_database(admin_dsn, name)
            _create_and_build(
                conn, admin_dsn, schema, name, base_template, require_objects, encoding
            )
            log.info("built template %s in %.2f s", name, time.perf_counter() - started)
            return name
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [_lock_key(name)])


def _created(dsn: str) -> tuple[int, ...]:
    """The counts of :data:`_CREATED_QUERY` in the database at *dsn*."""
    with admin(dsn) as conn:
        rows = conn.execute(_CREATED_QUERY)
    return tuple(rows[0]) if rows else ()


def _create_and_build(
    conn: Any,
    admin_dsn: str,
    schema: SchemaSource,
    name: str,
    base_template: str,
    require_objects: bool = False,
    encoding: str | None = None,
) -> None:
    source = _describe(schema)
    dsn = database_dsn(admin_dsn, name)
    options = f" ENCODING {quote_literal(encoding)}" if encoding else ""
    conn.execute(
        f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(base_template)}{options}"
    )
    try:
        set_mark(conn, name, make_mark("template", state="building", source=source))
        # Compared with what the base template brought, not with nothing: a server whose
        # template1 holds objects must not hide a schema step that built elsewhere.
        before = _created(dsn) if require_objects else ()
        _build(schema, dsn, name)
        if require_objects and _created(dsn) == before:
            raise EmptyTemplate(
                f"building template {name!r}: the schema step {source} ran but created "
                "nothing in it (no table, view, sequence, function, type, schema or "
                "extension)",
                template=name,
                source=source,
            )
        # The schema's own connections (a callable's engine pool, say) must not linger: a
        # template with sessions cannot be cloned.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        conn.execute(
            f"ALTER DATABASE {quote_ident(name)} WITH ALLOW_CONNECTIONS false IS_TEMPLATE true"
        )
        set_mark(conn, name, make_mark("template", state="ready", source=source))
    except BaseException:
        try:
            drop_database(admin_dsn, name)
        except Exception:
            log.exception("could not drop the failed template %s", name)
        raise
