"""The Django side of corral's Django support: which test databases a project has, the hash
that names their templates, and the template build (run as ``python -m`` in a child process).

Imported only once Django's settings are configured (pytest-django did that); nothing here
knows about pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SERIALIZED_SCHEMA",
    "BuildSpec",
    "Group",
    "admin_dsn_of",
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


# ------------------------------------------------------------------ the build (child process)


@dataclass
class BuildSpec:
    """What the controller asks the child process to build (JSON on its stdin).

    :ivar groups: ``(aliases, template)`` of the groups whose template is missing.
    :ivar dump_dir: where to keep a dump of each built template (corral's throwaway
        server, whose databases go with it), or None.
    """

    admin_dsn: str
    groups: list[tuple[list[str], str]]
    mirrors: dict[str, str]
    overrides: dict[str, str] = field(default_factory=dict)
    no_migrations: bool = False
    verbosity: int = 0
    base_templates: dict[str, str] = field(default_factory=dict)
    dump: dict[str, str] = field(default_factory=dict)
    pg_dump: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BuildSpec:
        data = json.loads(text)
        data["groups"] = [(list(a), str(t)) for a, t in data["groups"]]
        return cls(**data)


class MigrationFailed(Exception):
    """A migration raised; carries the migration Django was applying."""

    def __init__(self, alias: str, migration: str, error: str, details: str) -> None:
        super().__init__(error)
        self.alias = alias
        self.migration = migration
        self.error = error
        self.details = details


def disable_migrations() -> None:
    """What ``--no-migrations`` does (as pytest-django does): tables from the models."""
    from django.conf import settings

    class _DisableMigrations:
        def __contains__(self, item: str) -> bool:
            return True

        def __getitem__(self, item: str) -> None:
            return None

    settings.MIGRATION_MODULES = _DisableMigrations()


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def _build_group(spec: BuildSpec, aliases: list[str], template: str, dsn: str) -> None:
    """Migrate the (just created, empty) template database *template* the way Django's test
    runner migrates a test database, then store the ``serialize`` step's result in it."""
    from django.db import connections

    first = connections[aliases[0]]
    point_at(first.settings_dict, first.settings_dict["NAME"], spec.overrides)
    first.settings_dict.setdefault("TEST", {})["NAME"] = template
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
    target = spec.dump.get(template)
    if target:
        _dump(spec.pg_dump, dsn, Path(target))


def _dump(pg_dump: str, dsn: str, target: Path) -> None:
    """Keep the built template as a custom-format dump (written aside, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    result = subprocess.run(
        [pg_dump, "-Fc", "-Z1", "--no-owner", "--no-privileges", "-f", str(partial), dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        print(f"corral: could not cache the template: {result.stderr.strip()}", file=sys.stderr)
        return
    os.replace(partial, target)


def build(spec: BuildSpec) -> dict[str, Any]:
    """Build the spec's templates; returns ``{"built": [...]}`` or ``{"error": {...}}``."""
    import django

    django.setup()
    from corral.errors import TemplateBuildError
    from corral.postgres import ensure_template

    if spec.no_migrations:
        disable_migrations()
    built: list[str] = []
    for aliases, template in spec.groups:
        base = spec.base_templates.get(template) or "template1"

        def migrate(dsn: str, aliases: list[str] = aliases, template: str = template) -> None:
            _build_group(spec, aliases, template, dsn)

        try:
            ensure_template(spec.admin_dsn, migrate, name=template, base_template=base)
        except TemplateBuildError as exc:
            cause = exc.__cause__
            if isinstance(cause, MigrationFailed):
                return {"error": {**vars(cause), "template": template}}
            return {
                "error": {
                    "alias": aliases[0],
                    "migration": "",
                    "error": str(exc),
                    "details": "".join(traceback.format_exception(exc)),
                    "template": template,
                }
            }
        built.append(template)
    return {"built": built}


def main() -> int:
    spec = BuildSpec.from_json(sys.stdin.read())
    try:
        result = build(spec)
    except Exception as exc:  # Django could not even start: report it the same way
        result = {
            "error": {
                "alias": "",
                "migration": "",
                "error": f"{type(exc).__name__}: {exc}",
                "details": traceback.format_exc(),
                "template": "",
            }
        }
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 3 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
