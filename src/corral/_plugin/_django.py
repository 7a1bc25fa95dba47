"""Django support: with pytest-django and a PostgreSQL database, migrate once per run.

The controller (xdist's, or the only process) names a template per test database by a
hash of what defines it, builds the missing ones in-process with Django's own test-database
creation, and hands the names to the workers; each test process's ``django_db_setup``
(see :mod:`corral._plugin._django_fixtures`) clones them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from corral._plugin._background import Background
from corral._plugin._django_info import DjangoInfo
from corral._plugin._run import no_throwaway
from corral.errors import CorralError, TemplateBuildError

if TYPE_CHECKING:
    from corral._plugin._database import PreCloner
    from corral._plugin._django_setup import BuildSpec
    from corral._plugin._process import CorralProcess
    from corral.postgres import EphemeralPostgres

__all__ = [
    "ENV_DJANGO",
    "DjangoHooks",
    "DjangoInfo",
    "configure",
    "dump_project",
    "prune_dumps",
    "prune_snapshots",
]

log = logging.getLogger("corral.pytest")

#: What the controller hands to its workers (JSON; internal).
ENV_DJANGO = "CORRAL_DJANGO"
_SWITCH = ("auto", "on", "off")
_PROBE_TIMEOUT = 3
#: Dumps of built templates kept per project's test database (older migrations' go).
DUMPS_KEPT = 3
#: Seconds after which an unused dump goes (30 days).
DUMP_MAX_AGE = 30 * 24 * 3600.0
#: Seconds a build still running when the run ends (its statement cancelled) gets to end
#: before the clean-up; past that it is left to die with the process, its template marked
#: as being built (the next run drops and rebuilds it).
_BUILD_WAIT = 60.0
#: Bump when what a kept throwaway server's data directory holds changes.
_SNAPSHOT_FORMAT = 1


def configure(config: pytest.Config, process: CorralProcess) -> None:
    """Turn Django support on when it applies (called from the plugin's ``pytest_configure``).

    :raises pytest.UsageError: ``corral_django = on`` where it cannot apply, no usable
        server, or a migration failed (the run stops before any worker starts; under
        xdist the templates are built while the workers boot, and a failure is raised
        before the first test instead: :meth:`DjangoHooks.pytest_runtestloop`).
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
            raise _not_prepared(exc) from exc
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
        #: Dumps of built templates still being written: (pg_dump, partial file, target).
        self._dumps: list[tuple[subprocess.Popen[str], Path, Path]] = []
        #: The xdist controller's thread that clones the workers' databases while they boot.
        self.precloner: PreCloner | None = None
        #: Of those, how many the workers took (what they report when they end).
        self.taken = 0
        #: The templates this run needs (known before any server starts).
        self._wanted: list[str] = []
        #: Where the data directory of Django's own throwaway server is kept for the next
        #: run (None: no such server), and whether this run built a template there.
        self._snapshot: Path | None = None
        self._built_own = False
        #: Under xdist: what the build needs, until the session starts it in a thread.
        self._pending: tuple[list[dict[str, Any]], dict[str, str], bool] | None = None
        #: That thread, until the controller joined it, and what it builds now.
        self.build: Background | None = None
        self._building: BuildSpec | None = None
        #: How many notes the report header showed (the build's come later, in the summary).
        self._shown = 0

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
        from django.core.exceptions import ImproperlyConfigured

        from corral._plugin._django_setup import creation_options, database_groups, template_hash

        groups, mirrors, others = database_groups()
        if not groups:
            self.notes.append("corral: Django support off: no test database uses PostgreSQL")
            return
        no_migrations = bool(self.config.getvalue("nomigrations"))
        watch = self.process.settings.watch
        started = time.perf_counter()
        # Hashed first: a throwaway server can then start from a snapshot holding them.
        digests = [template_hash(g, no_migrations=no_migrations, watch=watch) for g in groups]
        self._wanted = sorted("corral_tpl_" + digest[:24] for digest in digests)
        self.timings["django hash"] = time.perf_counter() - started
        servers = self._servers([g.aliases[0] for g in groups])
        entries: list[dict[str, Any]] = []
        for group, digest in zip(groups, digests, strict=True):
            admin, overrides = servers[group.aliases[0]]
            try:
                base_template, encoding = creation_options(group.aliases[0])
            except ImproperlyConfigured as exc:
                raise pytest.UsageError(
                    f"corral: Django database {group.aliases[0]!r}: {exc}\nDjango would "
                    "refuse its TEST settings too: fix them (e.g. drop TEST['COLLATION'])"
                ) from exc
            entries.append(
                {
                    "aliases": list(group.aliases),
                    "template": "corral_tpl_" + digest[:24],
                    "admin_dsn": admin,
                    "overrides": overrides,
                    "base_template": base_template,
                    "encoding": encoding,
                }
            )
        run = self.process.info
        assert run is not None
        # The templates' names are known from the hashes: the workers can be told now.
        info = DjangoInfo(
            run_id=run.run_id,
            controller_pid=run.controller_pid,
            clone_tag=run.clone_tag,
            groups=entries,
            mirrors=mirrors,
            others=others,
        )
        if _starts_workers(self.config):
            # Built while xdist boots the workers (pytest_sessionstart), joined before the
            # first test is handed out (pytest_runtestloop).
            self._pending = (entries, mirrors, no_migrations)
            self.notes.append("corral: Django templates prepared while the workers start")
        else:
            self._prepare(entries, mirrors, no_migrations)
        self._export(info)

    def _prepare(
        self, entries: list[dict[str, Any]], mirrors: dict[str, str], no_migrations: bool
    ) -> None:
        started = time.perf_counter()
        self._templates(entries, mirrors, no_migrations)
        self.timings["django templates"] = time.perf_counter() - started

    def _export(self, info: DjangoInfo) -> None:
        self.info = info
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
            if self.process.info is None or self.process.info.admin_dsn is None:
                self._drop_stale(dsn)  # corral's database part is off: it did not
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
                server = EphemeralPostgres()
                self._snapshot = self._snapshot_path(server)
                seeded = self._start_from_snapshot(self._snapshot, server.bindir)
                if seeded:
                    self.timings["postgres start (snapshot)"] = time.perf_counter() - started
                    return seeded
                self.server = server.start()
            except CorralError as exc:
                why = " (no database server answers at Django's settings)"
                raise no_throwaway(exc, why) from exc
            self.timings["postgres start"] = time.perf_counter() - started
        return self.server.dsn

    def _snapshot_path(self, server: EphemeralPostgres) -> Path:
        """``~/.cache/corral/django/<project>-<key>.pgdata``: the data directory of a
        throwaway server holding this run's templates; the key hashes the templates' names
        (hashes of what defines them) and the installation and OS user that run it."""
        from corral.postgres._cache import cache_root

        aliases = sorted(_all_aliases())
        project = dump_project(self.config.rootpath, aliases)
        binaries, user = server.binaries, server.server_user
        installation = [binaries.version_string, str(binaries.bindir), user.uid]
        material = json.dumps([_SNAPSHOT_FORMAT, self._wanted, *installation])
        key = hashlib.sha256(material.encode()).hexdigest()[:16]
        return cache_root() / "django" / f"{project}-{key}.pgdata"

    def _start_from_snapshot(self, path: Path, bindir: Path) -> str | None:
        """Start corral's throwaway server from the data directory *path* an earlier run
        kept with these very templates inside (no restore, no migrating); None when there
        is none or it does not start (then it is removed)."""
        from corral.postgres import EphemeralPostgres

        if not (path / "PG_VERSION").is_file():
            return None
        server = EphemeralPostgres(seed=path, bindir=bindir)
        try:
            server.start()  # a missing template is built (and the copy replaced at the end)
        except Exception as exc:
            server.stop()
            log.warning("corral: the kept Django server %s is unusable, migrating: %s", path, exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used: what pruning keeps
        self.server, self._snapshot = server, path
        self.notes.append(f"corral: Django's throwaway PostgreSQL started from {path}")
        return server.dsn

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
            self.timings["django build"] = self.timings.get("django build", 0.0) + (
                time.perf_counter() - started
            )
            names = ", ".join(e["template"] for e in group)
            self.notes.append(f"corral: Django template {names} built by migrating")

    def _dump_path(self, entry: dict[str, Any]) -> Path | None:
        """``~/.cache/corral/django/<project>-<template>-pg<major>.dump`` for a template of
        corral's throwaway server (None on another server: the template stays there).
        ``<project>`` tells this project's test database from others' when pruning."""
        server = self._own_server(entry["admin_dsn"])
        if server is None or server is self.server:
            return None  # Django's own server: its data directory is kept (stop())
        from corral.postgres._cache import cache_root

        project = dump_project(self.config.rootpath, entry["aliases"])
        name = f"{project}-{entry['template']}-pg{server.version[0]}.dump"
        return cache_root() / "django" / name

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
        with contextlib.suppress(OSError):
            os.utime(path)  # used: what pruning keeps
        self.notes.append(
            f"corral: Django template {entry['template']} restored from {path} (no migrating)"
        )
        return True

    def _build(
        self, entries: list[dict[str, Any]], mirrors: dict[str, str], no_migrations: bool
    ) -> None:
        """Run Django's test-database creation for *entries*, in this process (Django is
        set up already: a child would pay its start-up again), past pytest-django's
        database blocker."""
        from corral._plugin._django_setup import BuildSpec, MigrationFailed, build

        first = entries[0]
        spec = BuildSpec(
            admin_dsn=first["admin_dsn"],
            groups=[(e["aliases"], e["template"]) for e in entries],
            mirrors=mirrors,
            overrides=first["overrides"],
            no_migrations=no_migrations,
            verbosity=int(self.config.option.verbose),
            base_templates={e["template"]: e["base_template"] for e in entries},
            encodings={e["template"]: e["encoding"] for e in entries if e["encoding"]},
        )
        self._building = spec
        try:
            with _unblocked(self.config):
                build(spec)
            for what, seconds in spec.timings.items():
                key = f"django {what}"
                self.timings[key] = self.timings.get(key, 0.0) + seconds
        except MigrationFailed as error:
            migration = f" in migration {error.migration}" if error.migration else ""
            raise pytest.UsageError(
                f"corral: Django's migrations failed{migration} (database {error.alias!r}, "
                f"template {error.template}), so no test ran.\n{error.error}\n\n"
                f"{error.details.rstrip()}"
            ) from None
        except TemplateBuildError as exc:
            raise pytest.UsageError(
                f"corral: building the Django test database template {exc.template} failed, "
                f"so no test ran:\n{exc}\n\n"
                f"{''.join(traceback.format_exception(exc)).rstrip()}"
            ) from None
        finally:
            self._building = None
        for entry in entries:
            self._start_dump(entry)
        if self.server is not None and first["admin_dsn"] == self.server.dsn:
            self._built_own = True  # worth keeping the server's data directory

    def _start_dump(self, entry: dict[str, Any]) -> None:
        """Keep a built template of corral's throwaway server as a dump for the next run,
        in the background (from a clone: a template takes no connection); :meth:`stop`
        waits for it before the server goes."""
        path = self._dump_path(entry)
        server = self._own_server(entry["admin_dsn"])
        if path is None or server is None:
            return
        from corral.postgres import clone_database, database_dsn

        admin = entry["admin_dsn"]
        source = clone_database(admin, entry["template"], entry["template"] + "_dump")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        command = [str(server.bindir / "pg_dump"), "-Fc", "-Z1", "--no-owner"]
        command += ["--no-privileges", "-f", str(partial), database_dsn(admin, source)]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self._dumps.append((process, partial, path))

    def _finish_dumps(self) -> None:
        dumps, self._dumps = self._dumps, []
        started = time.perf_counter()
        for process, partial, path in dumps:
            _out, err = process.communicate()
            if process.returncode == 0:
                os.replace(partial, path)
                continue
            partial.unlink(missing_ok=True)
            log.warning("corral: could not cache the Django template in %s: %s", path, err)
        if dumps:
            self.timings["django dump (wait)"] = time.perf_counter() - started
            prune_dumps(dumps[0][2].parent)

    def _settle(self) -> None:
        """End a build that was never joined (the run ended before its first test: Ctrl-C,
        an error at start-up) before its server, pytest-django's blocker and the run's
        clean-up go: its running statement is cancelled (the half-built template is then
        dropped, as when Ctrl-C interrupts a build in the main thread), and it gets
        :data:`_BUILD_WAIT` seconds to end; say if it failed otherwise."""
        build, self.build = self.build, None
        self._pending = None
        if build is None:
            return
        building, cancelled = self._building, False
        if building is not None and not build.wait(0):
            building.cancel()
            cancelled = True
        if not build.wait(_BUILD_WAIT):
            log.warning("corral: building the Django test database template did not end in time")
        elif build.error is not None and not build.reported and not cancelled:
            log.warning(
                "corral: preparing Django's test databases failed: %s", _not_prepared(build.error)
            )

    def stop(self) -> None:
        """Drop this run's Django clones (the workers are done), stop a server we started."""
        self._settle()
        info, self.info = self.info, None
        snapshot, self._snapshot = self._snapshot, None
        if info is None or not self._built_own:
            snapshot = None  # nothing new to keep
        if info is not None:
            self._drop_clones(info, own=snapshot is not None)
        self._finish_dumps()
        server, self.server = self.server, None
        if server is not None:
            try:
                if snapshot is not None:
                    self._keep(server, snapshot)
                else:
                    server.stop()
            except Exception as exc:
                log.debug("stopping the throwaway server: %s", exc)
        if self._exported:
            self._exported = False
            if self._env_saved is None:
                os.environ.pop(ENV_DJANGO, None)
            else:
                os.environ[ENV_DJANGO] = self._env_saved

    def _keep(self, server: EphemeralPostgres, snapshot: Path) -> None:
        """Stop Django's throwaway server keeping its data directory (templates only: the
        clones are dropped) for the next run with the same templates."""
        started = time.perf_counter()
        if server.stop_keeping(snapshot):
            self.timings["django keep server"] = time.perf_counter() - started
            prune_snapshots(snapshot.parent)

    def _drop_clones(self, info: DjangoInfo, *, own: bool = False) -> None:
        """Drop the run's clones; on corral's own server only with *own* (else they go with
        the server)."""
        from corral.postgres import drop_database
        from corral.postgres._databases import controller_clones

        started = time.perf_counter()
        for admin in dict.fromkeys(entry["admin_dsn"] for entry in info.groups):
            if self._own_server(admin) is not None and not own:
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

    # ------------------------------------------------------------------ xdist (controller)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self) -> None:
        """Start the build in a thread: after every plugin's ``pytest_configure`` (pytest-
        django's blocks database access there, which the build lifts for itself), before
        xdist's own ``pytest_sessionstart`` (trylast) spawns the workers."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.build = Background(lambda: self._prepare(*pending), "corral-django-build")
        self.build.start()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self) -> None:
        """Before xdist's loop hands out the first test: wait for the templates; a failed
        build stops the run here, once, with the error :func:`configure` would raise
        (xdist then stops the workers that were booting)."""
        build = self.build
        if build is None:
            return
        started = time.perf_counter()
        try:
            build.join()
        except pytest.UsageError:
            raise
        except Exception as exc:
            raise _not_prepared(exc) from exc
        finally:
            self.timings["django build (wait)"] = time.perf_counter() - started

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_setupnodes(self, specs: list[Any]) -> None:
        """Before the first worker is spawned: clone each worker's databases meanwhile (as
        :class:`~corral._plugin._database.PreCloner` does for corral's own database)."""
        run = self.process.info
        if self.info is None or self.precloner is not None or run is None or run.broker_url:
            return  # a Redis run's workers may be on other machines
        names = [str(spec.id) for spec in specs if getattr(spec, "id", None)]
        if not names:
            return
        from corral._plugin._database import PreCloner

        jobs = [
            (entry["admin_dsn"], entry["template"], self.info.clone_name(index, worker))
            for worker in names  # worker by worker: each needs all of its databases
            for index, entry in enumerate(self.info.groups)
        ]
        ready = self.build.outcome if self.build is not None else None
        self.precloner = PreCloner(run, len(names), None, jobs=jobs, ready=ready)
        # Runs before stop() (LIFO), which drops the run's clones: none may come after.
        self.config.add_cleanup(self._stop_precloner)
        self.precloner.start()

    def _stop_precloner(self) -> None:
        if self.precloner is not None and not self.precloner.stop():
            log.warning("corral: pre-creating the workers' Django databases did not stop in time")

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        output = getattr(node, "workeroutput", None) or {}
        taken = output.get("corral_django_precloned")
        if isinstance(taken, int):
            self.taken += taken

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        precloner = self.precloner
        if precloner is None:
            return
        self._stop_precloner()
        precloner.forget()
        if precloner.seconds is not None:
            made = len(precloner.made)
            self.timings[f"django pre-clone ({made} made, {self.taken} taken)"] = precloner.seconds

    # ------------------------------------------------------------------ hooks

    @pytest.hookimpl
    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        notes = list(self.notes)  # a copy: a build in its thread may add more
        self._shown = len(notes)
        return notes if config.option.verbose > 0 else []

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        if not self.process.is_controller or config.option.verbose <= 0:
            return
        for note in self.notes[self._shown :]:  # the build's, after the header
            terminalreporter.write_line(note)
        timings = dict(self.timings)
        if timings:
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
            terminalreporter.write_line(f"corral: Django set-up: {parts}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(self) -> None:
        # Before pytest-django's, which undoes every block/unblock, the build's included.
        self._settle()


def dump_project(rootpath: Path, aliases: list[str]) -> str:
    """What starts the names of a project's dumps of one test database (its aliases)."""
    where = f"{rootpath}\0{','.join(aliases)}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


def prune_dumps(directory: Path, now: float | None = None) -> list[Path]:
    """Keep the Django dump cache small: the newest :data:`DUMPS_KEPT` dumps of each
    project's test database and server version, none unused for :data:`DUMP_MAX_AGE`."""
    from corral.postgres._cache import prune

    def project(path: Path) -> str:
        parts = path.name.split("-")
        return f"{parts[0]}-{parts[-1]}"

    return prune(
        directory, keep=DUMPS_KEPT, max_age=DUMP_MAX_AGE, key=project, suffix=".dump", now=now
    )


def prune_snapshots(directory: Path, now: float | None = None) -> list[Path]:
    """Keep the kept throwaway servers few: the newest :data:`DUMPS_KEPT` per project,
    none unused for :data:`DUMP_MAX_AGE`."""
    from corral.postgres._cache import prune

    return prune(
        directory,
        keep=DUMPS_KEPT,
        max_age=DUMP_MAX_AGE,
        key=lambda path: path.name.split("-")[0],
        suffix=".pgdata",
        now=now,
    )


def _not_prepared(exc: BaseException) -> pytest.UsageError:
    """What a run whose Django test databases could not be prepared says (a UsageError
    raised on the way says it all already)."""
    if isinstance(exc, pytest.UsageError):
        return exc
    return pytest.UsageError(
        f"corral: Django support could not prepare the test databases: "
        f"{type(exc).__name__}: {exc}\n(ini corral_django = off leaves them to pytest-django)"
    )


def _starts_workers(config: pytest.Config) -> bool:
    """Whether this controller's run hands its tests to xdist workers (as xdist decides
    after its ``pytest_cmdline_main``); not with ``-n 0`` nor ``-p no:xdist``."""
    option = config.option
    return getattr(option, "dist", "no") != "no" and bool(getattr(option, "tx", None))


def _all_aliases() -> list[str]:
    from django.conf import settings

    return list(settings.DATABASES)


def _why_not(config: pytest.Config) -> str:
    """Why Django support cannot apply to this run ("" when it can)."""
    if not config.pluginmanager.hasplugin("django"):
        return "pytest-django is not active"
    if "django" not in sys.modules:
        return "pytest-django found no Django settings (DJANGO_SETTINGS_MODULE / --ds)"
    from django.conf import settings

    if not settings.configured:
        return "Django's settings are not configured"
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


@contextlib.contextmanager
def _unblocked(config: pytest.Config) -> Iterator[None]:
    """pytest-django blocks database access outside its fixtures; the build needs it."""
    from pytest_django.plugin import blocking_manager_key

    blocker = config.stash.get(blocking_manager_key, None)
    if blocker is None:
        yield
        return
    with blocker.unblock():
        yield
