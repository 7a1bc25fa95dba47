"""Warnings raised in a test are reported where they were raised, never at corral's own
wrapper around the test (issue 15)."""

from __future__ import annotations

import pytest

_SUITE = """
import warnings

import pytest


def deprecated():
    warnings.warn("old-api", DeprecationWarning, stacklevel=2)


@pytest.mark.asyncio
async def test_calls_a_deprecated_api():
    deprecated()


@pytest.mark.asyncio
async def test_warns_about_its_caller():
    warnings.warn("its-caller", DeprecationWarning, stacklevel=2)


@pytest.mark.asyncio
async def test_warns_here():
    warnings.warn("here", DeprecationWarning)


@pytest.mark.asyncio
async def test_expects_a_warning():
    with pytest.warns(DeprecationWarning, match="expected"):
        warnings.warn("expected", DeprecationWarning, stacklevel=2)


@pytest.mark.asyncio
async def test_warns_then_fails():
    warnings.warn("then-fails", DeprecationWarning, stacklevel=2)
    raise AssertionError("failed")
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_warnings_in_async_tests_are_reported_at_the_test(
    inner: pytest.Pytester, shared_server: str, workers: str
) -> None:
    inner.makepyfile(test_warns=_SUITE)
    result = inner.runpytest_subprocess(
        "-n", workers, "-p", "no:randomly", "-W", "default::DeprecationWarning", "test_warns.py"
    )
    result.assert_outcomes(passed=4, failed=1)
    out = result.stdout.str()
    assert "_sandbox.py" not in out, out
    assert "DeprecationWarning: expected" not in out, out  # pytest.warns caught it
    result.stdout.fnmatch_lines_random(
        [
            "*test_warns.py:12: DeprecationWarning: old-api",
            "*test_warns.py:15: DeprecationWarning: its-caller",  # where the test starts
            "*test_warns.py:22: DeprecationWarning: here",
            "*test_warns.py:31: DeprecationWarning: then-fails",
        ]
    )
