"""Keep the garbage collector off what a test process holds for its whole life.

Every pytest process ends with five full collections (pytest's ``gc_collect_harder``, which
surfaces unraisable exceptions) and Python's shutdown adds more. Each walks every object
the process holds: the imported modules, the application, the collected items — about
50 000 objects and 15-30 ms a pass for a small suite on a 2-CPU VM. Under xdist the
workers' exits and then the controller's sit end to end on the run's critical path, so
this was ~0.3 s of a 1 s parallel start-up-and-shutdown (measured, see docs/pytest.md).

``gc.freeze()`` once the tests are collected moves the objects that exist then into a
permanent generation that collections skip; what the tests create is collected as
before. A full collection right before the freeze clears what is garbage at that moment,
so nothing is kept that was already unreachable.

The trade-offs: a reference cycle made of objects that existed at freeze time and become
unreachable later is not collected (it stays in memory, and its ``__del__`` does not
run); and frozen objects are invisible to ``gc.get_objects()`` and ``gc.get_referrers()``
(leak hunters such as objgraph, tests counting live instances made at import). Objects
made by tests are not affected. A process freezes once: a pytest run started inside it
(pytester's in-process runs) does not freeze it again. Because tests can see all that, it
is opt-in: ``corral_gc_freeze = auto`` (with databases) or ``on``.
"""

from __future__ import annotations

import gc

import pytest

__all__ = ["GcFreeze"]

# Whether corral froze this process already (pytest runs may nest in one process).
_frozen_here = False


class GcFreeze:
    """Plugin object: freezes this process's heap after collection (xdist's controller,
    which collects nothing, once the session starts)."""

    def __init__(self) -> None:
        #: Objects moved to the permanent generation (0: not frozen yet).
        self.frozen = 0

    def freeze(self) -> None:
        global _frozen_here
        if _frozen_here:
            return  # an in-process run inside a run that froze already
        _frozen_here = True
        gc.collect()
        gc.freeze()
        self.frozen = gc.get_freeze_count()

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # xdist's controller registers its DSession as "dsession" (workers never do).
        if session.config.pluginmanager.has_plugin("dsession"):
            self.freeze()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.freeze()
