"""gc.freeze() after collection: what lives all run is kept out of collections."""

from __future__ import annotations

import json

import pytest

_TESTS = """
import gc, json, os, weakref


def test_record():
    with open(os.environ["GC_OUT"], "a") as out:
        out.write(json.dumps({
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "frozen": gc.get_freeze_count(),
        }) + "\\n")


def test_cycles_made_by_tests_are_still_collected():
    class Node:
        pass

    node = Node()
    node.me = node
    ref = weakref.ref(node)
    del node
    gc.collect()
    assert ref() is None
"""


@pytest.fixture
def gc_suite(
    pytester: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    from tests._inner import RUN_VARIABLES

    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORRAL_DSN", shared_server)
    monkeypatch.setenv("GC_OUT", str(pytester.path / "gc.jsonl"))
    pytester.makeini("[pytest]\ncorral_database = on\n")
    pytester.makepyfile(test_gc=_TESTS)
    return pytester


def _frozen(pytester: pytest.Pytester) -> dict[str, int]:
    lines = (pytester.path / "gc.jsonl").read_text().splitlines()
    return {r["worker"]: r["frozen"] for r in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_each_test_process_freezes_its_heap_after_collection(
    gc_suite: pytest.Pytester, workers: str
) -> None:
    gc_suite.makeini("[pytest]\ncorral_database = on\ncorral_gc_freeze = auto\n")  # opt-in
    result = gc_suite.runpytest_subprocess("-n", workers, "-v", "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    frozen = _frozen(gc_suite)
    assert frozen  # the test that records ran in some process
    # Modules, the app, pytest's collected items: thousands of objects in every process.
    assert all(count > 1000 for count in frozen.values()), frozen
    # The controller of -n 2 (which collects nothing) freezes too: three processes.
    processes = 1 if workers == "0" else 3
    result.stdout.fnmatch_lines(
        [f"gc.freeze (corral_gc_freeze): {processes} process(es), * objects each kept out*"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "extra_ini"),
    [
        ([], ""),  # the default: the app's collector is its own (gc.get_objects() sees all)
        (["--corral-gc-freeze=off"], "corral_gc_freeze = auto\n"),
        ([], "corral_gc_freeze = off\n"),
        (["--corral-gc-freeze=auto"], "corral_database = off\n"),  # only with databases
    ],
    ids=["default", "option-off", "ini-off", "auto-without-database"],
)
def test_off_leaves_the_collector_alone(
    gc_suite: pytest.Pytester, setting: list[str], extra_ini: str
) -> None:
    if "corral_database" in extra_ini:
        gc_suite.makeini(f"[pytest]\n{extra_ini}")
    else:
        gc_suite.makeini(f"[pytest]\ncorral_database = on\n{extra_ini}")
    result = gc_suite.runpytest_subprocess("-n", "0", "-v", "-v", *setting)
    result.assert_outcomes(passed=2)
    assert _frozen(gc_suite) == {"main": 0}
    result.stdout.no_fnmatch_line("*gc.freeze*")


@pytest.mark.slow
def test_a_bad_value_is_a_usage_error(
    gc_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_GC_FREEZE", "sometimes")
    result = gc_suite.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*CORRAL_GC_FREEZE must be auto, on or off, not 'sometimes'*"])
