"""Failure paths end to end: a worker dies, the schema is broken, Ctrl-C, leaked holdings."""

from __future__ import annotations

import re

import pytest

from corral.postgres import list_databases
from tests.plugin._checks import assert_nothing_left, facts, interrupt_pytest
from tests.plugin.test_runs import SAMPLE_TESTS


@pytest.mark.slow
def test_worker_dying_mid_test_fails_only_that_test(
    inner: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMPLE_CRASH", "1")
    monkeypatch.setenv("SAMPLE_FACTS", str(inner.path / "facts.json"))
    result = inner.runpytest_subprocess("-n", "2", "-v")
    result.assert_outcomes(passed=SAMPLE_TESTS - 1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*crashed while running*test_worker_dies_mid_test*",
            "*corral: crashed workers*",
            "gw* died mid-run*recycled*",
        ]
    )
    # The replacement worker took the dead one's slot and cloned it afresh (its tests,
    # which all assert they see only the seed row, passed).
    result.stdout.fnmatch_lines(
        ["*databases: 3 cloned (mean * ms to get one; * made by the controller*), 1 recycled*"]
    )
    assert_nothing_left(facts(inner.path / "facts.json"), shared_server)


@pytest.mark.slow
def test_failing_schema_fails_the_run_once(inner: pytest.Pytester, shared_server: str) -> None:
    schema = inner.path / "schema.sql"
    schema.write_text(schema.read_text() + "\nCREATE TABLE broken (id int REFERENCES nowhere);\n")
    before = {db.name for db in list_databases(shared_server)}
    result = inner.runpytest_subprocess("-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = result.stderr.str()
    assert errors.count('relation "nowhere" does not exist') == 1, errors
    assert "the schema failed to build (corral_schema), so no test ran" in errors
    assert "schema.sql" in errors
    assert "gw0" not in result.stdout.str()  # no worker was ever started
    assert {db.name for db in list_databases(shared_server)} == before


def test_unknown_schema_path_is_a_usage_error(inner: pytest.Pytester) -> None:
    (inner.path / "pytest.ini").write_text("[pytest]\ncorral_schema = missing.sql\n")
    result = inner.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*corral_schema: 'missing.sql' does not exist*"])


def test_no_postgresql_to_start_is_a_usage_error_that_says_what_to_do(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_PG_BINDIR", str(inner.path / "no-postgres-here"))
    result = inner.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*corral: cannot start a throwaway PostgreSQL: *CORRAL_PG_BINDIR*",
            "Point corral at a server instead: --corral-dsn / corral_dsn / CORRAL_DSN",
        ]
    )


@pytest.mark.slow
def test_ctrl_c_leaves_nothing_and_reports_holdings(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The throwaway server this time: Ctrl-C must take it down too.
    started, waiting = inner.path / "started", inner.path / "waiting"
    inner.makepyfile(
        test_hang=f"""
        import pathlib, time

        def test_hangs(corral):
            corral.lease("printers", "test_hangs", ttl=600)
            with corral.lock("migrations"):
                pathlib.Path({str(started)!r}).write_text("x")
                time.sleep(60)

        def test_waits(corral):
            while not pathlib.Path({str(started)!r}).exists():
                time.sleep(0.02)
            pathlib.Path({str(waiting)!r}).write_text("x")
            with corral.lock("migrations", timeout=60):
                pass
        """
    )
    monkeypatch.setenv("SAMPLE_FACTS", str(inner.path / "facts.json"))
    # settle: the waiter's lock request reaches the broker
    code, out = interrupt_pytest(inner.path, ["-n", "2", "test_hang.py"], waiting, settle=0.5)
    assert code == pytest.ExitCode.INTERRUPTED, out
    assert "corral warning: still held in the broker" in out, out
    assert "lease 'printers' #0 held by 'test_hangs' for" in out
    # Who holds the lock everyone waits for, and who waits: why the run hung.
    assert re.search(r"lock 'migrations' \(\d+\) held by 'gw\d' for [\d.]+ s", out), out
    assert re.search(r"lock 'migrations' waited for by 'gw\d' for [\d.]+ s", out), out
    assert_nothing_left(facts(inner.path / "facts.json"), None)


def test_leaked_holding_is_reported_at_the_end(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_leak="""
        from corral.broker import Client

        LEAKED = []

        def test_takes_and_keeps():
            client = Client()
            client.lease("api-keys", "test_takes_and_keeps", ttl=600)
            LEAKED.append(client)  # never released: the run's end must say so
        """
    )
    result = inner.runpytest_subprocess("-n", "0", "test_leak.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*corral warning: still held in the broker*",
            "lease 'api-keys' #0 held by 'test_takes_and_keeps' for * s",
        ]
    )


def test_broken_conftest_leaves_no_database(inner: pytest.Pytester, shared_server: str) -> None:
    # The clone was made before conftest.py was imported: it must go when that fails.
    (inner.path / "conftest.py").write_text("raise ImportError('conftest is broken')\n")

    def clones() -> set[str]:
        return {db.name for db in list_databases(shared_server) if db.kind == "clone"}

    before = clones()
    result = inner.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "conftest is broken" in result.stderr.str()
    assert clones() == before
