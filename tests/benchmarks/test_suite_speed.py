"""The suite benchmark's model: fixed cost + cost per test, and where -n 2 pays off."""

from __future__ import annotations

import pytest
from benchmarks.suite_speed import break_even


def test_break_even_solves_the_linear_model() -> None:
    # serial: 0.4 s + 2 ms/test; parallel: 0.9 s + 1 ms/test.
    # 1.6 * (0.9 + n * 0.001) = 0.4 + n * 0.002  =>  n = (1.44 - 0.4) / 0.0004 = 2600
    said = break_even(0.4, 2.0, 0.9, 1.0)
    assert said.startswith("~2,600 tests")
    assert "(5.2 s of serial corral)" in said
    serial, parallel = 0.4 + 2600 * 0.002, 0.9 + 2600 * 0.001
    assert serial / parallel == pytest.approx(1.6)


def test_break_even_says_never_when_the_per_test_ratio_is_below_the_target() -> None:
    said = break_even(0.4, 2.0, 0.9, 1.3)
    assert said.startswith("never on this machine")
    assert "tends to 1.54x" in said


def test_a_parallel_run_that_is_faster_from_the_start_needs_no_tests() -> None:
    assert break_even(1.0, 2.0, 0.5, 1.0).startswith("~0 tests")


def test_a_parallel_cost_per_test_lost_in_noise_is_said_so() -> None:
    assert break_even(0.4, 2.0, 0.9, 0.0).startswith("not measurable")
    assert break_even(0.4, 2.0, 0.9, -0.3).startswith("not measurable")


def test_too_few_tests_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.suite_speed import main

    with pytest.raises(SystemExit) as exc:
        main(["--tests", "2"])
    assert exc.value.code == 2
    assert "--tests must be more than 2" in capsys.readouterr().err
