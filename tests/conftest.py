"""Test-suite wide fixtures: plugin modules named ``tests/fix_*.py``."""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from corral._versions import ASYNCIO_FIXTURE_CONTEXT, installed, release

# Co-location's machine-wide CPU claims (corral._plugin._cpuclaim): the inner runs of this
# suite claim in a directory of their own, so they neither take CPUs from corral runs
# elsewhere on the machine nor lose co-location to them (which would fail their checks).
os.environ["CORRAL_CPU_CLAIMS"] = _CLAIMS = tempfile.mkdtemp(prefix="corral-test-cpu-claims-")
atexit.register(shutil.rmtree, _CLAIMS, ignore_errors=True)

pytest_plugins = ["tests.fix_broker", "tests.fix_postgres", "tests.fix_redis", "tests.fix_sandbox"]


#: pytest-asyncio before 0.24 (the run at the lowest versions): no loop_scope, and no
#: context carried from an async fixture into the test.
OLD_ASYNCIO = release(installed("pytest-asyncio") or "0") < release(ASYNCIO_FIXTURE_CONTEXT)


def pytest_addoption(parser: pytest.Parser) -> None:
    # pyproject sets it for pytest-asyncio >= 0.24, which warns when it is unset; older ones
    # do not know it, which --strict-config would refuse.
    if OLD_ASYNCIO:
        parser.addini("asyncio_default_fixture_loop_scope", "unused before pytest-asyncio 0.24")


if OLD_ASYNCIO:

    @pytest.fixture
    def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
        """The test's loop, whose tasks started by pytest-asyncio share one context.

        pytest-asyncio < 0.24 runs each async fixture's set-up, the test and each teardown
        in a task of its own, each with a copy of the context: the sandbox an async fixture
        opens (a context variable) would not be the test's. 0.24 carries it over; this does
        the same for the suite's fixtures. Tasks the test itself starts get their own copy.
        """
        loop = asyncio.new_event_loop()
        context = contextvars.copy_context()

        def task(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Task[Any]:
            if not loop.is_running():  # pytest-asyncio's run_until_complete()
                kwargs.setdefault("context", context)
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(task)  # type: ignore[arg-type]
        yield loop
        loop.close()
