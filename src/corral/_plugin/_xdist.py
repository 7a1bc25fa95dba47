"""pytest-xdist glue, registered only when xdist is present: run facts out, numbers back.

Workers also find the run in their environment (they need it before the config exists);
``workerinput`` is the fallback for workers started some other way. While xdist boots the
workers, the controller pre-creates their databases (:class:`PreCloner`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

from corral._plugin._process import STATE

if TYPE_CHECKING:
    from corral._plugin._database import PreCloner

__all__ = ["XdistHooks"]

log = logging.getLogger("corral.pytest")


class XdistHooks:
    """Controller-side hooks of pytest-xdist."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.precloner: PreCloner | None = None

    @pytest.hookimpl
    def pytest_xdist_setupnodes(self, specs: list[Any]) -> None:
        # Before the first worker is spawned: the clones overlap the workers' boot.
        process = self.config.stash.get(STATE, None)
        if self.precloner is not None or process is None or not specs:
            return
        info, database = process.info, process.database
        # A Redis run's slots are shared by every machine: which ones this machine's
        # workers get is not known in advance.
        if info is None or database is None or info.broker_url:
            return
        from corral._plugin._database import PreCloner

        self.precloner = PreCloner(info, len(specs), database.slot)
        # Runs before the process's own clean-up (LIFO), which drops the run's clones.
        self.config.add_cleanup(self._stop_precloner)
        self.precloner.start()

    @pytest.hookimpl
    def pytest_sessionfinish(self) -> None:
        # The workers are done (also after Ctrl-C): the hand-over is over, before the
        # report counts the broker's keys.
        precloner, process = self.precloner, self.config.stash.get(STATE, None)
        if precloner is None:
            return
        self._stop_precloner()
        precloner.forget()
        if process is not None and precloner.seconds is not None:
            name = f"pre-clone ({len(precloner.made)} databases)"
            process.timings[name] = precloner.seconds

    def _stop_precloner(self) -> None:
        # At session finish, then again (no second wait) at the config's clean-up.
        if self.precloner is not None and not self.precloner.stop():
            log.warning("corral: pre-creating the workers' databases did not stop in time")

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        process = self.config.stash.get(STATE, None)
        if process is not None and process.info is not None:
            node.workerinput["corral"] = process.info.to_json()

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        process = self.config.stash.get(STATE, None)
        if process is None:
            return
        name = getattr(getattr(node, "gateway", None), "id", "?")
        if error is not None:
            # Its broker connection closed with it: its database slot is free again, and
            # whichever worker leases it next (xdist's replacement) clones it afresh.
            process.crashed.append(str(name))
            log.warning("corral: worker %s crashed; its database will be recycled", name)
            return
        output = getattr(node, "workeroutput", {}) or {}
        due = output.get("corral_due")
        if isinstance(due, list):
            # Every worker collects the whole suite; one crashed worker's part is covered.
            process.workers_due.update(due)
        stats = output.get("corral")
        if isinstance(stats, dict):
            process.worker_stats[str(name)] = stats
