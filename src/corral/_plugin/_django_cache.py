"""What a Django run keeps for the next one on corral's throwaway PostgreSQL, under
``~/.cache/corral/django``: a dump of each template built on the run's server (restored
instead of migrating), and the data directory of Django's own server (started from).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, TemplateBuildError

if TYPE_CHECKING:
    from corral.postgres import EphemeralPostgres

__all__ = [
    "DUMPS_KEPT",
    "DUMP_MAX_AGE",
    "DjangoCache",
    "dump_project",
    "prune_dumps",
    "prune_snapshots",
]

log = logging.getLogger("corral.pytest")

#: Dumps of built templates kept per project's test database (older migrations' go).
DUMPS_KEPT = 3
#: Seconds after which an unused dump goes (30 days).
DUMP_MAX_AGE = 30 * 24 * 3600.0
#: Bump when what a kept throwaway server's data directory holds changes.
_SNAPSHOT_FORMAT = 1


class DjangoCache:
    """One run's use of the cache: it restores dumps and writes new ones (in the
    background, waited for by :meth:`finish_dumps`), and starts from and keeps data
    directories. What it did goes to *notes* (shown with ``-v``) and *timings*."""

    def __init__(self, rootpath: Path, notes: list[str], timings: dict[str, float]) -> None:
        self.rootpath = rootpath
        self.notes = notes
        self.timings = timings
        #: Dumps still being written: (pg_dump, partial file, target).
        self._dumps: list[tuple[subprocess.Popen[str], Path, Path]] = []

    # ------------------------------------------------------------------ dumps

    def _dump_path(self, entry: dict[str, Any], server: EphemeralPostgres) -> Path:
        """``~/.cache/corral/django/<project>-<template>-pg<major>.dump``: the dump of
        *entry*'s template on *server*. ``<project>`` tells this project's test database
        from others' when pruning."""
        from corral.postgres._cache import cache_root

        project = dump_project(self.rootpath, entry["aliases"])
        name = f"{project}-{entry['template']}-pg{server.version[0]}.dump"
        return cache_root() / "django" / name

    def restore(self, entry: dict[str, Any], server: EphemeralPostgres) -> bool:
        """Restore *entry*'s template on *server* from the dump an earlier run kept; False
        when there is none or it is unusable (then it is removed)."""
        path = self._dump_path(entry, server)
        if not path.is_file():
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

    def start_dump(self, entry: dict[str, Any], server: EphemeralPostgres) -> None:
        """Keep *entry*'s template, just built on *server*, as a dump for the next run,
        written in the background (from a clone: a template takes no connection);
        :meth:`finish_dumps` waits for it, before the server goes."""
        from corral.postgres import clone_database, database_dsn

        path = self._dump_path(entry, server)
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

    def finish_dumps(self) -> None:
        """Wait for the dumps being written; keep those that were, prune the others'."""
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

    # ------------------------------------------------------------------ data directories

    def snapshot_path(
        self, server: EphemeralPostgres, aliases: list[str], templates: list[str]
    ) -> Path:
        """``~/.cache/corral/django/<project>-<key>.pgdata``: the data directory of a
        throwaway server holding *templates* (the project's test databases are all of
        *aliases*); the key hashes the templates' names (hashes of what defines them) and
        the installation and OS user that run *server*."""
        from corral.postgres._cache import cache_root

        project = dump_project(self.rootpath, sorted(aliases))
        binaries, user = server.binaries, server.server_user
        installation = [binaries.version_string, str(binaries.bindir), user.uid]
        material = json.dumps([_SNAPSHOT_FORMAT, templates, *installation])
        key = hashlib.sha256(material.encode()).hexdigest()[:16]
        return cache_root() / "django" / f"{project}-{key}.pgdata"

    def start_from_snapshot(self, path: Path, bindir: Path) -> EphemeralPostgres | None:
        """Django's throwaway server, started (with *bindir*'s binaries) from the data
        directory *path* an earlier run kept with these very templates inside (no restore,
        no migrating); None when there is none or it does not start (then it is removed)."""
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
        self.notes.append(f"corral: Django's throwaway PostgreSQL started from {path}")
        return server

    def keep(self, server: EphemeralPostgres, snapshot: Path) -> None:
        """Stop Django's throwaway server keeping its data directory (templates only: the
        clones are dropped) for the next run with the same templates."""
        started = time.perf_counter()
        if server.stop_keeping(snapshot):
            self.timings["django keep server"] = time.perf_counter() - started
            prune_snapshots(snapshot.parent)


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
