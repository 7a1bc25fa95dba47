"""pytest-xdist glue, registered only when xdist is present: run facts out, numbers back.

Workers also find the run in their environment (they need it before the config exists);
``workerinput`` is the fallback for workers started some other way.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from corral._plugin._process import STATE

__all__ = ["XdistHooks"]

log = logging.getLogger("corral.pytest")


class XdistHooks:
    """Controller-side hooks of pytest-xdist."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

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
        stats = output.get("corral")
        if isinstance(stats, dict):
            process.worker_stats[str(name)] = stats
