"""``benchmarks.torture`` in a tiny configuration: kill -9 of holders and of the broker
loses no increment, duplicates no fencing token, and the report says so."""

from __future__ import annotations

import pytest
from benchmarks.torture import main, report, run


def test_a_tiny_torture_run_loses_nothing() -> None:
    result = run(clients=4, seconds=1.0, epochs=2, kills=2, seed=7)
    assert result.operations > 0
    assert result.lost_increments == 0
    assert result.duplicate_tokens == 0
    assert result.once_mismatches == 0
    assert len(result.restart) == 1  # the broker was killed and started again
    assert len(result.rss) == 2
    text = report(result)
    assert "lost increments (must be 0)" in text
    assert "time to free after kill -9" in text


def test_bad_arguments_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--clients", "1"])
    assert exc.value.code == 2
    assert "--clients >= 2" in capsys.readouterr().err
