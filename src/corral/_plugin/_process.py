"""One test process's part in a run: controller, xdist worker, or both (no xdist).

Set up in ``pytest_load_initial_conftests``, before any conftest file is imported, so
``CORRAL_DATABASE_URL`` is in the environment when application modules read it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from corral._plugin._gc import GcFreeze
from corral._plugin._run import AnyClient, Run, RunInfo, open_client
from corral._plugin._settings import ENV_RUN, ENV_SANDBOX_MODE, Settings

if TYPE_CHECKING:
    # Imported when used: a run without a database (or a sandboxed handle) never needs
    # the database, sandbox and co-location machinery, nor the driver modules they pull.
    from corral._plugin._census import Verdict
    from corral._plugin._colocate import Colocation
    from corral._plugin._database import WorkerDatabase
    from corral._plugin._sandbox import SandboxManager

__all__ = ["STATE", "CorralProcess", "worker_name"]

log = logging.getLogger("corral.pytest")


def worker_name() -> str:
    """``gw0``... in an xdist worker, ``main`` otherwise."""
    return os.environ.get("PYTEST_XDIST_WORKER") or "main"


def _inherited_run() -> RunInfo | None:
    """The run this process is a worker of, when its parent is that run's controller.

    Checking the parent pid keeps a pytest run *inside* a test (pytester) from taking
    itself for a worker of the outer run whose variables it inherited.
    """
    text = os.environ.get(ENV_RUN)
    if not text or "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    try:
        info = RunInfo.from_json(text)
    except (ValueError, TypeError):
        return None
    return info if info.controller_pid == os.getppid() else None


@dataclass
class CorralProcess:
    """State of the plugin in this process (stored on the config)."""

    settings: Settings
    run: Run | None = None
    info: RunInfo | None = None
    client: AnyClient | None = None
    database: WorkerDatabase | None = None
    colocation: Colocation | None = None
    colocate_off: str = ""  # why there is no co-location (for -v)
    gc: GcFreeze = field(default_factory=GcFreeze)
    timings: dict[str, float] = field(default_factory=dict)
    worker_stats: dict[str, Any] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)
    held_at_interrupt: dict[str, list[dict[str, Any]]] | None = None
    # The run check (a Redis run): node ids this process collected and owed the run
    # (None: it collected nothing), its workers' (controller), the ones that ran here.
    due: list[str] | None = None
    workers_due: set[str] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)
    verdict: Verdict | None = None
    #: one line per plugin feature an installed version left out (the report shows them)
    degraded: set[str] = field(default_factory=set)
    _manager: SandboxManager | None = None
    _mode_set: bool = False
    _stopped: bool = False

    @property
    def is_controller(self) -> bool:
        return self.run is not None

    @classmethod
    def start(cls, config: pytest.Config, info: RunInfo | None = None) -> CorralProcess:
        """Join the run (worker) or start it (controller), then take this process's database.

        :param info: the run to join (from ``workerinput``); default: the run inherited
            from the parent process, else a new one.
        :raises pytest.UsageError: the run could not start; nothing is left running.
        """
        settings = Settings.from_config(config)
        process = cls(settings)
        info = info or _inherited_run()
        try:
            if info is None:
                process.run = Run(settings)
                info = process.run.start()
                process.timings.update(process.run.timings)
            process.info = info
            process._join(info, config)
        except BaseException:
            process.stop()
            raise
        return process

    @property
    def identity(self) -> str:
        """This process in the run's shared names: ``gw0``, host-qualified with Redis
        (``runner-3/gw0``), since every machine has a ``gw0``."""
        if self.info is not None and self.info.broker_url:
            return f"{self.settings.host}/{worker_name()}"
        return worker_name()

    @property
    def manager(self) -> SandboxManager | None:
        """Opens the per-test sandboxes; None until this process has a database or the
        application imported :mod:`corral.sandbox` (before that no handle is sandboxed)."""
        if self._manager is None and (self.database is not None or "corral.sandbox" in sys.modules):
            self.require_manager()
        return self._manager

    def require_manager(self) -> None:
        """Make the sandbox manager now: its test wrapper also closes ``corral_async``."""
        if self._manager is None and self.info is not None and not self._stopped:
            from corral._plugin._sandbox import SandboxManager

            self._manager = SandboxManager(self.database, enabled=self.info.sandbox)

    def broker_client(self) -> AnyClient | None:
        """This process's client of the run's broker, opened now if the broker is in use
        (a local broker the plugin started is left asleep when nobody connected to it)."""
        if self.client is None and self.info is not None and not self._stopped:
            run = self.run
            if run is None or run.broker is None or run.broker.running:
                from corral.errors import BrokerError

                try:
                    self.client = self.open_client()
                except (BrokerError, ValueError) as exc:
                    log.debug("no client of the run's broker: %s", exc)
        return self.client

    def reports_nothing(self, verbose: int) -> bool:
        """Whether the end-of-run report has nothing to say (then its code is not even
        imported): not verbose, no crash, no run check, and a local broker the plugin
        started that no client ever connected to, so that it holds nothing."""
        run = self.run
        unused = (
            self.client is None
            and run is not None
            and run.broker is not None
            and not run.broker.running
        )
        quiet = not (self.crashed or self.held_at_interrupt or self.verdict is not None)
        return unused and quiet and verbose < 1

    def open_client(self) -> AnyClient:
        """A new blocking client of the run's broker, named after this process.

        :raises RuntimeError: the process has not joined a run.
        """
        if self.info is None:
            raise RuntimeError("corral: this process is not part of a run")
        return open_client(self.info, self.identity)

    def _colocate(self, config: pytest.Config) -> None:
        database = self.database
        assert database is not None
        assert self.info is not None
        assert self.info.admin_dsn is not None
        if self.settings.colocate == "off":
            return  # the default: not even imported
        from corral._plugin._colocate import Colocation

        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
        colocation, self.colocate_off = Colocation.plan(
            self.settings.colocate,
            self.info.admin_dsn,
            database.name,
            os.environ.get("PYTEST_XDIST_WORKER"),
            workers,
            generation=lambda: len(database.timings["recreate"]),
        )
        if colocation is None:
            log.debug("no co-location: %s", self.colocate_off)
            return
        self.colocation = colocation  # it pins before the first test this process runs
        config.pluginmanager.register(colocation, "corral-colocate")

    def _join(self, info: RunInfo, config: pytest.Config) -> None:
        if info.sandbox and os.environ.get(ENV_SANDBOX_MODE) is None:
            # Handles the application wraps with sandbox(...) at import start in sandbox mode.
            self._mode_set = True
            os.environ[ENV_SANDBOX_MODE] = "sandbox"
        if info.admin_dsn is None and not info.broker_url:
            # Without a database nothing here needs the broker: the client (and the local
            # broker's server, started at its first connection) wait for the first use.
            return
        from corral.errors import BrokerError, CorralError

        try:
            self.client = self.open_client()
        except (BrokerError, ValueError) as exc:
            raise pytest.UsageError(f"corral: cannot reach the run's broker: {exc}") from exc
        if info.admin_dsn is not None:
            # Unique in the run across machines: the lease of the database slot names it.
            from corral._plugin._database import WorkerDatabase

            assert self.client is not None
            worker = f"{self.identity}@{os.getpid()}"
            self.database = WorkerDatabase(info, self.client, worker)
            started = time.perf_counter()
            try:
                self.database.acquire()
            except CorralError as exc:
                raise pytest.UsageError(
                    f"corral: cannot create this process's database: {exc}"
                ) from exc
            self.timings["own database"] = time.perf_counter() - started
            self._colocate(config)

    def select(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Keep this invocation's shard of *items* (``--corral-shard``), after every other
        deselection, and remember what it owed the run: its shard and the others'."""
        self.due = [item.nodeid for item in items]
        shard = self.settings.shard
        if shard is None:
            return
        from corral._plugin._shard import split

        kept, dropped = split(items, shard)
        if dropped:
            items[:] = kept
            config.hook.pytest_deselected(items=dropped)

    @property
    def tracks_tests(self) -> bool:
        """Whether this process keeps node ids for the run check or the shard's exit code."""
        redis = self.info is not None and bool(self.info.broker_url)
        return redis or self.settings.shard is not None

    def owed(self) -> set[str]:
        """What this machine owed the run: its own collection, or its workers'."""
        return set(self.due or ()) | self.workers_due

    def stats(self) -> dict[str, Any]:
        """This process's numbers, sent from a worker to the controller at its end."""
        out: dict[str, Any] = {"sandboxes": 0, "sandbox_seconds": 0.0}
        if self._manager is not None:
            out["sandboxes"] = self._manager.opened
            out["sandbox_seconds"] = self._manager.seconds
        if self.database is not None:
            out["clone"] = list(self.database.timings["clone"])
            out["recreate"] = list(self.database.timings["recreate"])
            out["recycled"] = self.database.recycled
            out["precloned"] = int(self.database.precloned)
        colocation = self.colocation
        if colocation is not None and colocation.pinned:
            out["colocated"] = {
                "process": worker_name(),
                "cpu": colocation.cpu,
                "pinned": len(colocation.pinned),
            }
        elif self.colocate_off:
            out["colocate_off"] = self.colocate_off
        elif colocation is not None and colocation.failed not in ("", "stopped"):
            out["colocate_off"] = colocation.failed
        if self.gc.frozen:
            out["gc_frozen"] = self.gc.frozen
        if self.degraded:
            out["degraded"] = sorted(self.degraded)
        return out

    def stop(self) -> None:
        """Release this process's database and connection; the controller ends the run.

        Idempotent; also registered with ``atexit``, in case pytest never gets to its own
        clean-up (an exception escaping it, a plugin calling ``sys.exit``).
        """
        if self._stopped:
            return
        self._stopped = True
        if self.colocation is not None:
            self.colocation.stop()
            self.colocation = None
        if self.database is not None:
            self.database.release()
            self.database = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._mode_set:
            os.environ.pop(ENV_SANDBOX_MODE, None)
            self._mode_set = False
        if self.run is not None:
            self.run.stop()
            self.timings.update(self.run.timings)


STATE = pytest.StashKey[CorralProcess]()


def sandbox_manager(
    request: pytest.FixtureRequest, *, scope: bool = False
) -> SandboxManager | None:
    """This process's sandbox manager, for a sandbox fixture; None when there is none (the
    plugin off, no database and no sandboxed handle) or, with *scope*, when the fixture's
    scope gets no sandbox level of its own (:meth:`SandboxManager.wants_scope`)."""
    process = request.config.stash.get(STATE, None)
    manager = None if process is None else process.manager
    if manager is None or (scope and not manager.wants_scope(request)):
        return None
    return manager
