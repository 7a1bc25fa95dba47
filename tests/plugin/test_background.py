"""The controller's background set-up (a Django build under xdist): its error reaches the
joining thread once, a pre-cloner waiting on it makes nothing when it failed, and what the
build prints stays apart from what other threads print meanwhile."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any, cast

import pytest

from corral._plugin._background import Background
from corral._plugin._database import PreCloner
from corral._plugin._django_setup import _captured
from corral._plugin._run import RunInfo


def test_the_error_is_raised_by_join_once() -> None:
    gate = threading.Event()

    def fail() -> None:
        gate.wait(5)
        raise pytest.UsageError("the migration broke")

    work = Background(fail, "test-build")
    work.start()
    assert work.outcome(0.01) is None  # still running
    assert not work.wait(0.05)
    gate.set()
    assert work.outcome(5) is False
    with pytest.raises(pytest.UsageError, match="the migration broke"):
        work.join()
    assert work.reported
    work.join()  # raised once: the run reports it once
    assert isinstance(work.error, pytest.UsageError)


def test_a_build_that_worked_joins_quietly() -> None:
    done: list[str] = []
    work = Background(lambda: done.append("built"), "test-build")
    work.start()
    work.join()
    assert done == ["built"]
    assert work.outcome(0) is True
    assert work.error is None
    assert not work.reported


def _precloner(ready: Any) -> PreCloner:
    # Nothing is cloned in these tests: the run is never looked at.
    return PreCloner(cast(RunInfo, None), 2, None, jobs=[], ready=ready)


def test_the_precloner_makes_nothing_when_the_build_failed() -> None:
    answers = iter([None, None, False])
    asked: list[float] = []

    def ready(timeout: float) -> bool | None:
        asked.append(timeout)
        return next(answers)

    precloner = _precloner(ready)
    precloner.start()
    assert precloner.stop(timeout=5)
    assert len(asked) == 3  # waited for the build's outcome before anything else
    assert precloner.made == []
    assert precloner.tried == []
    assert precloner.seconds is None


def test_the_precloner_stops_while_waiting_for_a_long_build() -> None:
    asked = threading.Event()

    def ready(timeout: float) -> bool | None:
        asked.set()
        return None  # still building

    precloner = _precloner(ready)
    precloner.start()
    assert asked.wait(5)
    assert precloner.stop(timeout=5)
    assert precloner.made == []
    assert precloner.seconds is None


def test_a_build_thread_captures_only_its_own_output() -> None:
    others = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = others
    captured: list[str] = []
    inside, leave = threading.Event(), threading.Event()

    def build() -> None:
        with _captured() as output:
            print("Applying shop.0001_initial...")
            sys.stderr.write("Creating test database\n")
            inside.set()
            leave.wait(5)
        captured.append(output.getvalue())

    try:
        thread = threading.Thread(target=build)
        thread.start()
        assert inside.wait(5)
        print("[gw0] node ready")  # the controller's main thread, meanwhile
        assert not sys.stdout.isatty()
        leave.set()
        thread.join(5)
        assert sys.stdout is others
        assert sys.stderr is others
    finally:
        sys.stdout, sys.stderr = saved
    assert captured == ["Applying shop.0001_initial...\nCreating test database\n"]
    assert others.getvalue() == "[gw0] node ready\n"
