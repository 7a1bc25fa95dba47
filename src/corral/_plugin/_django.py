"""Django support: with pytest-django and a PostgreSQL database, migrate once per run.

The controller (xdist's, or the only process) names a template per test database by a
hash of what defines it, builds the missing ones in-process with Django's own test-database
creation, and hands the names to the workers; each test process's ``django_db_setup``
(see :mod:`corral._plugin._django_fixtures`) clones them. On corral's throwaway server,
what the next run can start from is kept by :mod:`corral._plugin._django_cache`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from corral._plugin._background import Background
from corral._plugin._django_checks import probe, starts_workers, template_ready, where, why_not
from corral._plugin._django_info import DjangoInfo
from corral._plugin._run import no_throwaway
from corral.errors import CorralError, TemplateBuildError

if TYPE_CHECKING:
    from corral._plugin._database import PreCloner
    from corral._plugin._django_cache import DjangoCache
    from corral._plugin._django_setup import BuildSpec
    from corral._plugin._process import CorralProcess
    from corral.postgres import EphemeralPostgres

__all__ = [
    "ENV_DJANGO",
    "DjangoHooks",
    "DjangoInfo",
    "configure",
]

log = logging.getLogger("corral.pytest")

#: What the controller hands to its workers (JSON; internal).
ENV_DJANGO = "CORRAL_DJANGO"
_SWITCH = ("auto", "on", "off")
#: Seconds a build still running when the run ends (its statement cancelled) gets to end
#: before the clean-up; past that it is left to die with the process, its template marked
#: as being built (the next run drops and rebuilds it).
_BUILD_WAIT = 60.0


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
        #: Django's own throwaway server: started when no server answers at Django's
        #: settings and corral's database part started none (:meth:`_throwaway`).
        self.server: EphemeralPostgres | None = None
        self._env_saved: str | None = None
        self._exported = False
        #: What this run keeps for the next on corral's throwaway server (made when first
        #: needed: :meth:`_get_cache`).
        self._cache: DjangoCache | None = None
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
        why = why_not(self.config)
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
        if starts_workers(self.config):
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
            error = probe(candidate)
            if error is None:
                found[alias] = (candidate, {})
                self._drop_stale(candidate)
                at = where(connections[alias].settings_dict)
                self.notes.append(f"corral: Django database {alias!r}: the server at {at}")
                continue
            throwaway = self._throwaway()
            found[alias] = (throwaway, overrides_for(throwaway))
            self.notes.append(
                f"corral: Django database {alias!r}: no server reachable at "
                f"{where(connections[alias].settings_dict)} ({error}); "
                "using corral's throwaway PostgreSQL (HOST/PORT/USER/PASSWORD point at it)"
            )
        return found

    def _throwaway(self) -> str:
        """The DSN of corral's throwaway server: the run's when corral's database part
        started one, else Django's own, started from the data directory an earlier run
        kept with these templates when there is one."""
        run = self.process.run
        if run is not None and run.server is not None:
            return run.server.dsn
        if self.server is None:
            from django.conf import settings

            from corral.postgres import EphemeralPostgres

            cache = self._get_cache()
            started = time.perf_counter()
            try:
                server = EphemeralPostgres()
                self._snapshot = cache.snapshot_path(server, list(settings.DATABASES), self._wanted)
                seeded = cache.start_from_snapshot(self._snapshot, server.bindir)
                if seeded is not None:
                    self.server = seeded
                    self.timings["postgres start (snapshot)"] = time.perf_counter() - started
                    return seeded.dsn
                self.server = server.start()
            except CorralError as exc:
                why = " (no database server answers at Django's settings)"
                raise no_throwaway(exc, why) from exc
            self.timings["postgres start"] = time.perf_counter() - started
        return self.server.dsn

    def _own_server(self, admin: str) -> EphemeralPostgres | None:
        """The throwaway server behind *admin*, when corral started it for this run."""
        run = self.process.run
        for server in (self.server, run.server if run is not None else None):
            if server is not None and server.dsn == admin:
                return server
        return None

    def _run_server(self, admin: str) -> EphemeralPostgres | None:
        """The throwaway server of corral's database part when it is behind *admin*: the
        templates built there are kept as dumps. (Django's own throwaway server keeps its
        whole data directory instead: :meth:`stop`.)"""
        run = self.process.run
        server = run.server if run is not None else None
        return server if server is not None and server.dsn == admin else None

    def _get_cache(self) -> DjangoCache:
        """What this run keeps for the next on corral's throwaway server (imported only
        when a run uses that server)."""
        if self._cache is None:
            from corral._plugin._django_cache import DjangoCache

            self._cache = DjangoCache(self.config.rootpath, self.notes, self.timings)
        return self._cache

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
            if template_ready(admin, template):
                self.notes.append(f"corral: Django template {template} reused (no migrating)")
                continue
            server = self._run_server(admin)
            if server is not None and self._get_cache().restore(entry, server):
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
            server = self._run_server(entry["admin_dsn"])
            if server is not None:
                self._get_cache().start_dump(entry, server)
        if self.server is not None and first["admin_dsn"] == self.server.dsn:
            self._built_own = True  # worth keeping the server's data directory

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
        if self._cache is not None:
            self._cache.finish_dumps()
        server, self.server = self.server, None
        if server is not None:
            try:
                if snapshot is not None:
                    self._get_cache().keep(server, snapshot)
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


def _not_prepared(exc: BaseException) -> pytest.UsageError:
    """What a run whose Django test databases could not be prepared says (a UsageError
    raised on the way says it all already)."""
    if isinstance(exc, pytest.UsageError):
        return exc
    return pytest.UsageError(
        f"corral: Django support could not prepare the test databases: "
        f"{type(exc).__name__}: {exc}\n(ini corral_django = off leaves them to pytest-django)"
    )


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
