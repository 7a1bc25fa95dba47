"""The sample suite end to end: serial and parallel, all green, nothing left behind."""

from __future__ import annotations

import pytest

from tests.plugin._checks import assert_nothing_left, facts

# Tests in the sample suite: 12 + 5 + 1 (crash test, harmless without SAMPLE_CRASH)
# in test_items.py, 11 + 4 async, 3 no_sandbox, 3 on module data.
SAMPLE_TESTS = 39


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "shuffle"),
    [("0", "1"), ("2", ""), ("4", "2")],
    ids=["n0-shuffled", "n2", "n4-shuffled"],
)
def test_sample_suite_passes_and_leaves_nothing(
    inner: pytest.Pytester,
    shared_server: str,
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
    shuffle: str,
) -> None:
    monkeypatch.setenv("SAMPLE_FACTS", str(inner.path / "facts.json"))
    monkeypatch.setenv("SAMPLE_SHUFFLE", shuffle)
    result = inner.runpytest_subprocess("-n", workers, "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=SAMPLE_TESTS)
    result.stdout.fnmatch_lines(["*-- corral --*", "*sandboxes: * opened and rolled back*"])
    assert_nothing_left(facts(inner.path / "facts.json"), shared_server)


@pytest.mark.slow
def test_last_failed_reruns_only_the_failure(
    inner: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMPLE_FAIL", "1")
    first = inner.runpytest_subprocess("-n", "0")
    first.assert_outcomes(passed=SAMPLE_TESTS - 1, failed=1)
    monkeypatch.delenv("SAMPLE_FAIL")
    again = inner.runpytest_subprocess("-n", "2", "--lf")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(["*2 workers [[]1 item[]]*"])


@pytest.mark.slow
def test_with_pytest_randomly(inner: pytest.Pytester, shared_server: str) -> None:
    # A dev dependency, switched off for the project's own runs (addopts: -p no:randomly)
    # and switched on here, in the inner runs.
    for workers, seed in (("0", "1"), ("2", "2")):
        result = inner.runpytest_subprocess(
            "-n", workers, "-p", "randomly", f"--randomly-seed={seed}"
        )
        result.assert_outcomes(passed=SAMPLE_TESTS)
        result.stdout.fnmatch_lines([f"Using --randomly-seed={seed}"])
