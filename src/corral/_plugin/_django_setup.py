"""The Django side of corral's Django support: which test databases a project has, the hash
that names their templates, and the template build (in the controller, with Django's own
test-database creation).

Imported only once Django's settings are configured (pytest-django did that); nothing here
knows about pytest.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SERIALIZED_SCHEMA",
    "BuildSpec",
    "Group",
    "MigrationFailed",
    "admin_dsn_of",
    "build",
    "creation_options",
    "database_groups",
    "is_postgres",
    "overrides_for",
    "template_hash",
]

#: The schema, in each template, that keeps the ``serialize`` step's result for
#: ``serialized_rollback``. Not on the search path, so Django's introspection (flush,
#: ``table_names()``) never sees it.
SERIALIZED_SCHEMA = "corral_django"
# Django's ENGINE paths for PostgreSQL (PostGIS's backend is PostgreSQL's plus GIS types).
_POSTGRES_ENGINES = (
    "django.db.backends.postgresql",
    "django.db.backends.postgresql_psycopg2",
    "django.contrib.gis.db.backends.postgis",
)
# Settings keys of a database that feed a template's hash. HOST, PORT, USER, PASSWORD and
# NAME say where the database lives, not what is in it.
_TEST_KEYS = ("TEMPLATE", "CHARSET", "COLLATION", "MIGRATE", "SERIALIZE")
# libpq parameters that may sit in a PostgreSQL database's OPTIONS.
_LIBPQ_OPTIONS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "passfile",
    "service",
    "options",
    "target_session_attrs",
    "application_name",
)
_APPLYING = re.compile(r"Applying (\S+?)\.\.\.")


def is_postgres(settings_dict: Mapping[str, Any]) -> bool:
    """Whether a ``DATABASES`` entry uses a PostgreSQL backend."""
    engine = str(settings_dict.get("ENGINE", ""))
    return engine in _POSTGRES_ENGINES or engine.endswith(".postgresql")


@dataclass(frozen=True)
class Group:
    """Aliases that share one test database (Django's ``test_db_signature()``), hence one
    template; the first is the one Django migrates (``default`` when it is in the group).

    :ivar template: the template's name, once the controller has hashed it.
    """

    aliases: tuple[str, ...]
    template: str = ""


def database_groups() -> tuple[list[Group], dict[str, str], list[str]]:
    """``(groups, mirrors, others)``: PostgreSQL test databases, ``TEST["MIRROR"]`` aliases
    (alias -> the alias they mirror) and the aliases of other backends, which Django sets
    up itself."""
    from django.db import connections
    from django.test.utils import get_unique_databases_and_mirrors

    test_databases, mirrors = get_unique_databases_and_mirrors()
    groups: list[Group] = []
    others: list[str] = []
    for _name, aliases in test_databases.values():
        if is_postgres(connections[aliases[0]].settings_dict):
            groups.append(Group(tuple(aliases)))
        else:
            others.extend(aliases)
    return groups, dict(mirrors), others


def _hash_tree(digest: Any, root: Path) -> None:
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def _module_dir(module_name: str) -> Path | None:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    paths = list(getattr(module, "__path__", []))
    if paths:
        return Path(paths[0])
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def _hash_app(digest: Any, app: Any, *, no_migrations: bool) -> None:
    """An app's migration files (names and contents); its models' source when it has no
    migrations, since Django then creates its tables from the models (``run_syncdb``)."""
    from django.db.migrations.loader import MigrationLoader

    digest.update(f"app:{app.label}:{app.name}\0".encode())
    module_name, _ = MigrationLoader.migrations_module(app.label)
    where = None if no_migrations or module_name is None else _module_dir(module_name)
    if where is not None and where.is_dir():
        digest.update(b"migrations\0")
        _hash_tree(digest, where)
        return
    models = getattr(app.models_module, "__file__", None)
    if models:
        path = Path(models)
        digest.update(b"models\0")
        if path.name == "__init__.py":
            _hash_tree(digest, path.parent)
        else:
            digest.update(path.read_bytes() + b"\0")


def _describe_modules(modules: Any) -> str:
    """``MIGRATION_MODULES`` as text: a mapping's items, or the class of an object that
    answers for every app (the "disable migrations in tests" settings idiom)."""
    try:
        return repr(sorted(dict(modules).items()))
    except (TypeError, ValueError):
        return f"{type(modules).__module__}.{type(modules).__qualname__}"


def template_hash(group: Group, *, no_migrations: bool, watch: Iterable[Path] = ()) -> str:
    """The hex SHA-256 that names *group*'s template.

    What defines a migrated test database: every installed app's migration files (or its
    models, without migrations), Django's version, the settings that shape migrations
    (``INSTALLED_APPS``, ``MIGRATION_MODULES``, routers, the user model, the default
    primary key type), the group's backend and ``TEST`` options, ``--no-migrations``, and
    the ``corral_schema_watch`` paths.
    """
    import django
    from django.apps import apps
    from django.conf import settings
    from django.db import connections

    digest = hashlib.sha256(b"corral-django-template-v1\0")
    head = {
        "django": django.get_version(),
        "no_migrations": no_migrations,
        "aliases": list(group.aliases),
        "installed_apps": list(settings.INSTALLED_APPS),
        "migration_modules": _describe_modules(settings.MIGRATION_MODULES),
        "routers": repr(list(settings.DATABASE_ROUTERS)),
        "user_model": settings.AUTH_USER_MODEL,
        "auto_field": getattr(settings, "DEFAULT_AUTO_FIELD", ""),
    }
    databases = {}
    for alias in group.aliases:
        settings_dict = connections[alias].settings_dict
        test = settings_dict.get("TEST") or {}
        databases[alias] = {
            "engine": settings_dict.get("ENGINE"),
            "test": {key: repr(test.get(key)) for key in _TEST_KEYS},
        }
    head["databases"] = databases
    digest.update(json.dumps(head, sort_keys=True).encode() + b"\0")
    for app in apps.get_app_configs():
        _hash_app(digest, app, no_migrations=no_migrations)
    for path in watch:
        digest.update(f"watch:{path.name}\0".encode())
        if path.is_dir():
            _hash_tree(digest, path)
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def creation_options(alias: str) -> tuple[str, str]:
    """``(base template, encoding)`` of *alias*'s test database, from its ``TEST`` settings,
    as Django's PostgreSQL backend creates it (``TEST["COLLATION"]`` is refused there, so
    here too: with Django's own error).

    :raises django.core.exceptions.ImproperlyConfigured: what Django would raise.
    """
    from django.db import connections

    connection = connections[alias]
    connection.creation.sql_table_creation_suffix()  # Django's own checks of TEST
    test = connection.settings_dict.get("TEST") or {}
    return str(test.get("TEMPLATE") or "template1"), str(test.get("CHARSET") or "")


def admin_dsn_of(settings_dict: Mapping[str, Any]) -> str:
    """A libpq DSN of the server a Django database lives on, for its maintenance database
    ``postgres`` (where Django's own test-database creation connects too)."""
    from psycopg.conninfo import make_conninfo

    params: dict[str, Any] = {"dbname": "postgres"}
    for key, param in (("HOST", "host"), ("PORT", "port"), ("USER", "user")):
        value = settings_dict.get(key)
        if value:
            params[param] = str(value)
    password = settings_dict.get("PASSWORD")
    if password:
        params["password"] = str(password)
    options = settings_dict.get("OPTIONS") or {}
    for key in _LIBPQ_OPTIONS:
        if options.get(key) is not None:
            params[key] = str(options[key])
    return make_conninfo(**params)


def overrides_for(admin_dsn: str) -> dict[str, str]:
    """``HOST``/``PORT``/``USER``/``PASSWORD`` that point a Django database at the server of
    *admin_dsn* (corral's throwaway server, or ``--corral-dsn``)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(admin_dsn)
    return {
        "HOST": str(params.get("host") or ""),
        "PORT": str(params.get("port") or ""),
        "USER": str(params.get("user") or ""),
        "PASSWORD": str(params.get("password") or ""),
    }


def point_at(settings_dict: dict[str, Any], name: str, overrides: Mapping[str, str]) -> None:
    """Make a database's settings name *name* (on the overriding server, if any)."""
    settings_dict["NAME"] = name
    if overrides:
        settings_dict.update(overrides)
        options = settings_dict.get("OPTIONS")
        if isinstance(options, dict):
            # A service or password file names the user's server, not corral's.
            for key in ("service", "passfile"):
                options.pop(key, None)


# ------------------------------------------------------------------ the build


@dataclass
class BuildSpec:
    """What the controller builds: the groups whose template is missing, on one server.

    :ivar groups: ``(aliases, template)`` of each group.
    :ivar base_templates: per template, what it is created from (``TEST["TEMPLATE"]``).
    :ivar encodings: per template, its ``ENCODING`` (``TEST["CHARSET"]``), as Django
        would create the test database.
    """

    admin_dsn: str
    groups: list[tuple[list[str], str]]
    mirrors: dict[str, str]
    overrides: dict[str, str] = field(default_factory=dict)
    no_migrations: bool = False
    verbosity: int = 0
    base_templates: dict[str, str] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)
    #: Filled by the build: seconds spent in Django's ``create_test_db`` and ``serialize``.
    timings: dict[str, float] = field(default_factory=dict)
    #: The Django connection the build migrates through (its thread's), for :meth:`cancel`.
    migrating: Any = None

    def cancel(self) -> None:
        """From another thread: cancel the statement the build is running (the run ends
        before its first test, and a thread cannot be interrupted), so that the migration
        fails now and the half-built template is dropped; Python steps still run out."""
        wrapper = self.migrating
        connection = getattr(wrapper, "connection", None)
        if connection is not None:
            with contextlib.suppress(Exception):  # closed meanwhile: nothing to cancel
                connection.cancel()


class MigrationFailed(Exception):
    """A migration raised; carries the migration Django was applying."""

    def __init__(self, alias: str, migration: str, error: str, details: str) -> None:
        super().__init__(error)
        self.alias = alias
        self.migration = migration
        self.error = error
        self.details = details
        self.template = ""


def disable_migrations() -> None:
    """What ``--no-migrations`` does (as pytest-django does): tables from the models."""
    from django.conf import settings

    class _DisableMigrations:
        def __contains__(self, item: str) -> bool:
            return True

        def __getitem__(self, item: str) -> None:
            return None

    settings.MIGRATION_MODULES = _DisableMigrations()


class _Routed:
    """``sys.stdout``/``sys.stderr`` during a build: the building thread's writes go to its
    buffer, every other thread's to the stream this replaced. Django's ``create_test_db``
    takes no stream (it writes to ``sys.stderr``, and ``migrate`` to ``sys.stdout``, looked
    up when called), and the build may run beside the xdist controller's main thread,
    which must keep its own output."""

    def __init__(self, original: Any, buffer: io.StringIO, thread: int) -> None:
        self.original = original
        self._buffer = buffer
        self._thread = thread
        self.active = True

    def _target(self) -> Any:
        if self.active and threading.get_ident() == self._thread:
            return self._buffer
        return self.original

    def write(self, text: str) -> int:
        return int(self._target().write(text))

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    """What this thread prints meanwhile (Django's progress, a failed migration's name)."""
    buffer = io.StringIO()
    thread = threading.get_ident()
    out, err = _Routed(sys.stdout, buffer, thread), _Routed(sys.stderr, buffer, thread)
    sys.stdout, sys.stderr = out, err
    try:
        yield buffer
    finally:
        out.active = err.active = False  # from now on they only pass writes through
        # Unless another thread replaced them meanwhile (and will put ours back: harmless).
        if sys.stdout is out:
            sys.stdout = out.original
        if sys.stderr is err:
            sys.stderr = err.original


@contextlib.contextmanager
def _settings_kept() -> Iterator[None]:
    """Give Django's database settings back as they were: building a template points the
    connections (and ``settings.DATABASES``) at it, as ``create_test_db`` does. Restored in
    place: a connection's ``settings_dict`` is the very dict in ``settings.DATABASES``,
    which other threads' connections (``live_server``) are made from."""
    from django.conf import settings
    from django.db import connections

    dicts = [connections[alias].settings_dict for alias in connections]
    dicts += list(settings.DATABASES.values())
    saved = {id(d): (d, copy.deepcopy(d)) for d in dicts}
    modules = settings.MIGRATION_MODULES
    try:
        yield
    finally:
        for alias in connections:
            connections[alias].close()
        for target, before in saved.values():
            target.clear()
            target.update(before)
        settings.MIGRATION_MODULES = modules


def _build_group(spec: BuildSpec, aliases: list[str], template: str) -> None:
    """Migrate the (just created, empty) template database *template* the way Django's test
    runner migrates a test database, then store the ``serialize`` step's result in it."""
    from django.db import connections

    first = connections[aliases[0]]
    point_at(first.settings_dict, first.settings_dict["NAME"], spec.overrides)
    first.settings_dict.setdefault("TEST", {})["NAME"] = template
    spec.migrating = first
    started = time.perf_counter()
    with _captured() as output:
        try:
            # keepdb: the database exists (corral created it, marked as being built); Django
            # migrates it, runs the data migrations and post_migrate handlers, and makes
            # the cache tables, exactly as for its own test databases.
            first.creation.create_test_db(
                verbosity=max(spec.verbosity, 2), autoclobber=True, serialize=False, keepdb=True
            )
        except Exception as exc:
            applying = _APPLYING.findall(output.getvalue())
            error = f"{type(exc).__name__}: {exc}"
            raise MigrationFailed(
                aliases[0], applying[-1] if applying else "", error, traceback.format_exc()
            ) from exc
    for alias in aliases[1:]:
        connections[alias].creation.set_as_test_mirror(first.settings_dict)
    for alias, mirror in spec.mirrors.items():
        if mirror in aliases:
            connections[alias].creation.set_as_test_mirror(first.settings_dict)
    _add_time(spec.timings, "create_test_db", started)
    started = time.perf_counter()
    test = first.settings_dict.get("TEST") or {}
    data = first.creation.serialize_db_to_string() if test.get("SERIALIZE", True) else None
    with first.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA {SERIALIZED_SCHEMA}")
        cursor.execute(
            f"CREATE TABLE {SERIALIZED_SCHEMA}.serialized (alias text PRIMARY KEY, data text)"
        )
        for alias in aliases:
            cursor.execute(
                f"INSERT INTO {SERIALIZED_SCHEMA}.serialized VALUES (%s, %s)", [alias, data]
            )
    for alias in connections:
        connections[alias].close()
    _add_time(spec.timings, "serialize", started)


def _add_time(timings: dict[str, float], what: str, started: float) -> None:
    timings[what] = timings.get(what, 0.0) + time.perf_counter() - started


def build(spec: BuildSpec) -> list[str]:
    """Build the spec's templates in this process (Django is set up: pytest-django did it),
    leaving Django's settings as they were; returns the templates built.

    :raises MigrationFailed: a migration raised (``template`` says whose).
    :raises TemplateBuildError: the build failed otherwise.
    """
    from corral.errors import TemplateBuildError
    from corral.postgres import ensure_template

    built: list[str] = []
    with _settings_kept():
        if spec.no_migrations:
            disable_migrations()
        for aliases, template in spec.groups:

            def migrate(_dsn: str, aliases: list[str] = aliases, template: str = template) -> None:
                _build_group(spec, aliases, template)

            try:
                ensure_template(
                    spec.admin_dsn,
                    migrate,
                    name=template,
                    base_template=spec.base_templates.get(template) or "template1",
                    encoding=spec.encodings.get(template) or None,
                )
            except TemplateBuildError as exc:
                cause = exc.__cause__
                if isinstance(cause, MigrationFailed):
                    cause.template = template
                    raise cause from None
                raise
            built.append(template)
    return built
