"""Django support: with pytest-django and a PostgreSQL database, migrate once per run.

The controller (xdist's, or the only process) names a template per test database by a
hash of what defines it, builds the missing ones with Django's own test-database creation
in a child process, and hands the names to the workers; each test process's
``django_db_setup`` (see :mod:`corral._plugin._django_fixtures`) clones them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from corral.errors import CorralError, TemplateBuildError

if TYPE_CHECKING:
    from corral._plugin._process import CorralProcess
    from corral.postgres import EphemeralPostgres

__all__ = ["ENV_DJANGO", "DjangoHooks", "DjangoInfo", "configure"]

log = logging.getLogger("corral.pytest")

#: What the controller hands to its workers (JSON; internal).
ENV_DJANGO = "CORRAL_DJANGO"
_SWITCH = ("auto", "on", "off")
_PROBE_TIMEOUT = 3
_MAX_NAME = 63


@dataclass(frozen=True)
class DjangoInfo:
    """The run's Django templates, as the workers need them (JSON in ``CORRAL_DJANGO``).

    :ivar groups: per test database: its aliases (the first is migrated), its template,
        the admin DSN of its server, and the ``HOST``/``PORT``/``USER``/``PASSWORD`` that
        point the aliases at that server (empty: the settings' own server).
    :ivar mirrors: ``TEST["MIRROR"]`` aliases -> the alias they mirror.
    :ivar others: aliases on other backends (SQLite...), which Django sets up itself.
    """

    run_id: str
    controller_pid: int
    clone_tag: str
    groups: list[dict[str, Any]]
    mirrors: dict[str, str] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DjangoInfo:
        return cls(**json.loads(text))

    def clone_name(self, index: int, worker: str) -> str:
        """``corral_<run>_dj<index>_<worker>`` (with the machine's tag in a Redis run)."""
        tag = f"_{self.clone_tag}" if self.clone_tag else ""
        name = f"corral_{self.run_id}_dj{index}{tag}_{worker}"
        if len(name) > _MAX_NAME:
            import hashlib

            digest = hashlib.sha1(name.encode()).hexdigest()[:10]
            name = f"corral_dj{index}_{digest}_{worker}"[:_MAX_NAME]
        return name


def configure(config: pytest.Config, process: CorralProcess) -> None:
    """Turn Django support on when it applies (called from the plugin's ``pytest_configure``).

    :raises pytest.UsageError: ``corral_django = on`` where it cannot apply, no usable
        server, or a migration failed (the run stops before any worker starts).
    """
    mode = str(config.getini("corral_django")).strip().lower() or "auto"
    if mode not in _SWITCH:
        raise pytest.UsageError(f"ini corral_django must be auto, on or off, not {mode!r}")
    if mode == "off" or process.info is None:
        return
    hooks = DjangoHooks(config, process)
    config.pluginmanager.register(hooks, "corral-django")
    if process.is_controller:
        config.add_cleanup(hooks.stop)
        try:
            hooks.start(on=mode == "on")
        except (pytest.UsageError, KeyboardInterrupt):
            hooks.stop()
            raise
        except Exception as exc:  # a server that refuses us, a permission missing...
            hooks.stop()
            raise pytest.UsageError(
                f"corral: Django support could not prepare the test databases: "
                f"{type(exc).__name__}: {exc}\n(ini corral_django = off leaves them to "
                "pytest-django)"
            ) from exc
        except BaseException:
            hooks.stop()
            raise
    else:
        hooks.join()
    if hooks.info is not None:
        from corral._plugin import _django_fixtures

        config.pluginmanager.register(_django_fixtures, "corral-django-fixtures")


class DjangoHooks:
    """The Django part of one process: the controller's templates, or a worker's view."""

    def __init__(self, config: pytest.Config, process: CorralProcess) -> None:
        self.config = config
        self.process = process
        self.info: DjangoInfo | None = None
        #: What ``-v`` says about Django support.
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.server: EphemeralPostgres | None = None
        self._env_saved: str | None = None
        self._exported = False

    # ------------------------------------------------------------------ controller

    def start(self, *, on: bool) -> None:
        if self.config.option.collectonly:
            self.notes.append("corral: Django support idle: --collect-only runs no test")
            return
        why = _why_not(self.config)
        if why:
            if on:
                raise pytest.UsageError(f"corral_django = on, but {why}")
            self.notes.append(f"corral: Django support off: {why}; corral's broker only")
            return
        from corral._plugin._django_setup import database_groups, template_hash

        groups, mirrors, others = database_groups()
        if not groups:
            self.notes.append("corral: Django support off: no test database uses PostgreSQL")
            return
        no_migrations = bool(self.config.getvalue("nomigrations"))
        watch = self.process.settings.watch
        servers = self._servers([g.aliases[0] for g in groups])
        started = time.perf_counter()
        entries: list[dict[str, Any]] = []
        for group in groups:
            admin, overrides = servers[group.aliases[0]]
            digest = template_hash(group, no_migrations=no_migrations, watch=watch)
            entries.append(
                {
                    "aliases": list(group.aliases),
                    "template": "corral_tpl_" + digest[:24],
                    "admin_dsn": admin,
                    "overrides": overrides,
                }
            )
        self.timings["django hash"] = time.perf_counter() - started
        self._templates(entries, mirrors, no_migrations)
        run = self.process.info
        assert run is not None
        self.info = DjangoInfo(
            run_id=run.run_id,
            controller_pid=run.controller_pid,
            clone_tag=run.clone_tag,
            groups=entries,
            mirrors=mirrors,
            others=others,
        )
        self._env_saved = os.environ.get(ENV_DJANGO)
        os.environ[ENV_DJANGO] = self.info.to_json()
        self._exported = True

    def _servers(self, aliases: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
        """Per migrated alias: ``(admin DSN, settings overrides)`` of the server its test
        database goes to: ``--corral-dsn``; else the settings' own server when it answers
        (as pytest-django would use it); else corral's throwaway server."""
        from django.db import connections

        from corral._plugin._django_setup import admin_dsn_of, overrides_for

        dsn = self.process.settings.dsn
        if dsn:
            self.notes.append("corral: Django test databases on the --corral-dsn server")
            return {alias: (dsn, overrides_for(dsn)) for alias in aliases}
        found: dict[str, tuple[str, dict[str, str]]] = {}
        for alias in aliases:
            candidate = admin_dsn_of(connections[alias].settings_dict)
            error = _probe(candidate)
            if error is None:
                found[alias] = (candidate, {})
                self._drop_stale(candidate)
                where = _where(connections[alias].settings_dict)
                self.notes.append(f"corral: Django database {alias!r}: the server at {where}")
                continue
            throwaway = self._throwaway()
            found[alias] = (throwaway, overrides_for(throwaway))
            self.notes.append(
                f"corral: Django database {alias!r}: no server reachable at "
                f"{_where(connections[alias].settings_dict)} ({error}); "
                "using corral's throwaway PostgreSQL (HOST/PORT/USER/PASSWORD point at it)"
            )
        return found

    def _throwaway(self) -> str:
        run = self.process.run
        if run is not None and run.server is not None:
            return run.server.dsn
        if self.server is None:
            from corral.postgres import EphemeralPostgres

            started = time.perf_counter()
            try:
                self.server = EphemeralPostgres().start()
            except CorralError as exc:
                raise pytest.UsageError(
                    f"corral: no database server reachable from Django's settings, and a "
                    f"throwaway PostgreSQL could not start: {exc}\n"
                    "Point corral at a server: --corral-dsn / corral_dsn / CORRAL_DSN"
                ) from exc
            self.timings["postgres start"] = time.perf_counter() - started
        return self.server.dsn

    def _own_server(self, admin: str) -> EphemeralPostgres | None:
        """The throwaway server behind *admin*, when corral started it for this run."""
        run = self.process.run
        for server in (self.server, run.server if run is not None else None):
            if server is not None and server.dsn == admin:
                return server
        return None

    def _drop_stale(self, admin: str) -> None:
        from corral.postgres import drop_stale_databases

        try:
            dropped = drop_stale_databases(admin)
        except Exception as exc:  # no rights to list/drop: not ours to insist
            log.debug("stale clean-up on the Django server skipped: %s", exc)
            return
        if dropped:
            log.info("dropped %d stale database(s) of crashed runs", len(dropped))

    def _templates(
        self, entries: list[dict[str, Any]], mirrors: dict[str, str], no_migrations: bool
    ) -> None:
        """Reuse, restore from the dump cache, or build each entry's template."""
        from corral.postgres import drop_database

        recreate = bool(self.config.getvalue("create_db"))
        missing: list[dict[str, Any]] = []
        for entry in entries:
            admin, template = entry["admin_dsn"], entry["template"]
            if recreate:
                drop_database(admin, template)
            if _ready(admin, template):
                self.notes.append(f"corral: Django template {template} reused (no migrating)")
                continue
            if self._restore(entry):
                continue
            missing.append(entry)
        by_server: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in missing:
            key = (entry["admin_dsn"], json.dumps(entry["overrides"], sort_keys=True))
            by_server.setdefault(key, []).append(entry)
        for group in by_server.values():
            started = time.perf_counter()
            self._build(group, mirrors, no_migrations)
            self.timings["django migrate"] = self.timings.get("django migrate", 0.0) + (
                time.perf_counter() - started
            )
            names = ", ".join(e["template"] for e in group)
            self.notes.append(f"corral: Django template {names} built by migrating")

    def _dump_path(self, entry: dict[str, Any]) -> Path | None:
        server = self._own_server(entry["admin_dsn"])
        if server is None:
            return None
        from corral.postgres import default_cache_dir

        return (
            default_cache_dir().parent
            / "django"
            / f"{entry['template']}-pg{server.version[0]}.dump"
        )

    def _restore(self, entry: dict[str, Any]) -> bool:
        """Restore a throwaway server's template from the dump an earlier run kept."""
        path = self._dump_path(entry)
        server = self._own_server(entry["admin_dsn"])
        if path is None or server is None or not path.is_file():
            return False
        from corral.postgres import ensure_template

        pg_restore = str(server.bindir / "pg_restore")
        started = time.perf_counter()

        def restore(dsn: str) -> None:
            result = subprocess.run(
                [
                    pg_restore,
                    "--no-owner",
                    "--no-privileges",
                    "--single-transaction",
                    "-d",
                    dsn,
                    str(path),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise CorralError(f"pg_restore {path}: {result.stderr.strip()}")

        try:
            ensure_template(entry["admin_dsn"], restore, name=entry["template"])
        except TemplateBuildError as exc:
            log.warning("corral: the cached Django template is unusable, migrating: %s", exc)
            path.unlink(missing_ok=True)
            return False
        self.timings["django restore"] = time.perf_counter() - started
        self.notes.append(
            f"corral: Django template {entry['template']} restored from {path} (no migrating)"
        )
        return True

    def _build(
        self, entries: list[dict[str, Any]], mirrors: dict[str, str], no_migrations: bool
    ) -> None:
        """Run Django's test-database creation for *entries* in a child process."""
        from django.db import connections

        from corral._plugin._django_setup import BuildSpec

        first = entries[0]
        dump = {e["template"]: str(p) for e in entries if (p := self._dump_path(e)) is not None}
        server = self._own_server(first["admin_dsn"])
        spec = BuildSpec(
            admin_dsn=first["admin_dsn"],
            groups=[(e["aliases"], e["template"]) for e in entries],
            mirrors=mirrors,
            overrides=first["overrides"],
            no_migrations=no_migrations,
            verbosity=int(self.config.option.verbose),
            base_templates={
                e["template"]: (connections[e["aliases"][0]].settings_dict.get("TEST") or {}).get(
                    "TEMPLATE"
                )
                or "template1"
                for e in entries
            },
            dump=dump,
            pg_dump=str(server.bindir / "pg_dump") if server is not None else "",
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.pop(ENV_DJANGO, None)
        result = subprocess.run(
            [sys.executable, "-m", "corral._plugin._django_setup"],
            input=spec.to_json(),
            capture_output=True,
            text=True,
            env=env,
            cwd=str(self.config.invocation_params.dir),
            check=False,
        )
        outcome = _outcome(result.stdout)
        if outcome is None:
            raise pytest.UsageError(
                "corral: building the Django test database template failed, so no test ran "
                f"(exit code {result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
            )
        error = outcome.get("error")
        if error:
            migration = f" in migration {error['migration']}" if error["migration"] else ""
            raise pytest.UsageError(
                f"corral: Django's migrations failed{migration} (database {error['alias']!r}, "
                f"template {error['template']}), so no test ran.\n{error['error']}\n\n"
                f"{error['details'].rstrip()}"
            )

    def stop(self) -> None:
        """Drop this run's Django clones (the workers are done), stop a server we started."""
        info, self.info = self.info, None
        if info is not None:
            self._drop_clones(info)
        server, self.server = self.server, None
        if server is not None:
            try:
                server.stop()
            except Exception as exc:
                log.debug("stopping the throwaway server: %s", exc)
        if self._exported:
            self._exported = False
            if self._env_saved is None:
                os.environ.pop(ENV_DJANGO, None)
            else:
                os.environ[ENV_DJANGO] = self._env_saved

    def _drop_clones(self, info: DjangoInfo) -> None:
        from corral.postgres import drop_database
        from corral.postgres._databases import controller_clones

        started = time.perf_counter()
        for admin in dict.fromkeys(entry["admin_dsn"] for entry in info.groups):
            if self._own_server(admin) is not None:
                continue  # goes with the server
            try:
                names = [
                    db.name
                    for db in controller_clones(admin, info.run_id, info.controller_pid)
                    if db.name.startswith(f"corral_{info.run_id}_dj")
                ]
                for name in names:
                    drop_database(admin, name)
            except Exception as exc:  # never hide the run's own result
                log.warning("could not drop this run's Django databases: %s", exc)
        self.timings["django drop clones"] = time.perf_counter() - started

    # ------------------------------------------------------------------ worker

    def join(self) -> None:
        """Take the run's templates from the controller (nothing: Django support is off)."""
        text = os.environ.get(ENV_DJANGO)
        run = self.process.info
        if not text or run is None:
            return
        info = DjangoInfo.from_json(text)
        if info.run_id == run.run_id and info.controller_pid == run.controller_pid:
            self.info = info

    # ------------------------------------------------------------------ hooks

    @pytest.hookimpl
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return list(self.notes) if config.option.verbose > 0 else []

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        if self.process.is_controller and config.option.verbose > 0 and self.timings:
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
            terminalreporter.write_line(f"corral: Django set-up: {parts}")


def _why_not(config: pytest.Config) -> str:
    """Why Django support cannot apply to this run ("" when it can)."""
    if not config.pluginmanager.hasplugin("django"):
        return "pytest-django is not active"
    if "django" not in sys.modules:
        return "pytest-django found no Django settings (DJANGO_SETTINGS_MODULE / --ds)"
    from django.conf import settings

    if not settings.configured:
        return "Django's settings are not configured"
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return "DJANGO_SETTINGS_MODULE is not set (corral migrates in a child process)"
    from corral._plugin._django_setup import is_postgres

    databases = dict(settings.DATABASES)
    if not any(is_postgres(d) for d in databases.values()):
        engines = ", ".join(sorted({str(d.get("ENGINE")) for d in databases.values()}))
        return f"no database uses PostgreSQL ({engines or 'no DATABASES'})"
    return ""


def _probe(admin: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(admin, connect_timeout=_PROBE_TIMEOUT):
            return None
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _where(settings_dict: dict[str, Any]) -> str:
    host = settings_dict.get("HOST") or "the default socket"
    port = settings_dict.get("PORT") or 5432
    return f"{host}:{port}"


def _ready(admin: str, template: str) -> bool:
    """Whether a finished template of that name exists (a half-built one does not count:
    :func:`~corral.postgres.ensure_template` drops and rebuilds it)."""
    from corral.postgres._admin import admin as connect
    from corral.postgres._databases import template_ready

    with connect(admin) as conn:
        return bool(template_ready(conn, template))


def _outcome(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None
