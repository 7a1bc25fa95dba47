"""This test process's own database: a slot leased through the broker, cloned from the template.

The slot number comes from a broker lease owned by this process's connection, so when
the process dies its slot frees at once and the replacement worker takes it over; every
acquisition clones afresh, which is how a crashed worker's database gets recycled.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from corral._plugin._run import AnyClient, RunInfo
from corral._plugin._settings import ENV_DATABASE_URL, restore_env
from corral.postgres import clone_database, database_dsn, drop_database

__all__ = ["SLOT_KEY", "WorkerDatabase"]

log = logging.getLogger("corral.pytest")

#: The broker lease key whose integers number the run's databases.
SLOT_KEY = "corral:databases"
# Leases are freed when the holder's connection closes; the TTL is only a backstop and
# must outlive any run, so it is renewed now and then (see renew()).
_LEASE_TTL = 24 * 3600.0
_RENEW_EVERY = 3600.0


class WorkerDatabase:
    """The clone one process (xdist worker, or the only process) runs its tests on.

    :param info: the run's shared facts (admin DSN, template, controller pid).
    :param client: this process's broker connection (or Redis session); it owns the
        slot's lease.
    :param worker: a name unique in the run, e.g. ``"gw0@1234"`` (``"runner-3/gw0@1234"``
        when the run spans machines).
    """

    def __init__(self, info: RunInfo, client: AnyClient, worker: str) -> None:
        assert info.admin_dsn is not None
        assert info.template is not None
        self.info = info
        self.client = client
        self.worker = worker
        self.slot: int | None = None
        self.name = ""
        self.url = ""
        self.timings: dict[str, list[float]] = {"clone": [], "recreate": []}
        self.recycled = 0
        self._renewed = 0.0
        self._env_saved: dict[str, str | None] = {}

    def acquire(self) -> str:
        """Lease a slot, (re)create its database, export its URL; returns the URL."""
        info = self.info
        self.slot = self.client.lease(SLOT_KEY, self.worker, ttl=_LEASE_TTL)
        self._renewed = time.monotonic()
        self.name = info.clone_name(self.slot)
        self.url = database_dsn(info.admin_dsn, self.name)  # type: ignore[arg-type]
        started = time.perf_counter()
        # A database under this slot belonged to a process that died: start clean.
        if drop_database(info.admin_dsn, self.name):  # type: ignore[arg-type]
            self.recycled += 1
            log.info("recycled database %s of a worker that went away", self.name)
        self._clone()
        self.timings["clone"].append(time.perf_counter() - started)
        self._export([ENV_DATABASE_URL, *info.database_env])
        return self.url

    def recreate(self) -> None:
        """Replace the database with a fresh clone under the same name (same URL)."""
        started = time.perf_counter()
        drop_database(self.info.admin_dsn, self.name)  # type: ignore[arg-type]
        self._clone()
        self.timings["recreate"].append(time.perf_counter() - started)

    def renew(self) -> None:
        """Keep the slot's lease alive in very long runs (cheap; rate-limited)."""
        if self.slot is not None and time.monotonic() - self._renewed > _RENEW_EVERY:
            self.client.lease(SLOT_KEY, self.worker, ttl=_LEASE_TTL)
            self._renewed = time.monotonic()

    def release(self) -> None:
        """Give the slot back; the controller drops the databases at the end of the run."""
        restore_env(self._env_saved)
        if self.slot is not None:
            self.slot = None
            try:
                self.client.release(self.worker)
            except Exception as exc:  # the broker may be gone already (Ctrl-C)
                log.debug("releasing database slot: %s", exc)

    def _clone(self) -> None:
        info = self.info
        clone_database(
            info.admin_dsn,  # type: ignore[arg-type]
            info.template,  # type: ignore[arg-type]
            self.name,
            # Marked as the controller's: a worker that exits must not make it look stale.
            owner_pid=info.controller_pid,
            run_id=info.run_id,
        )

    def _export(self, names: Iterable[str]) -> None:
        for name in names:
            self._env_saved.setdefault(name, os.environ.get(name))
            os.environ[name] = self.url
