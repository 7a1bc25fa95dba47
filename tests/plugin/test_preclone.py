"""The xdist controller pre-creates the workers' databases while they boot (PreCloner).

Inner runs record, per test process, whether its database was pre-created; a boot delay
plugin (``-p boot_delay``) makes the workers arrive after the controller's clones, and a
slow-clone plugin makes them arrive during one.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from corral.postgres import drop_database, list_databases
from corral.postgres._sql import connect, ident, sql
from tests.plugin._checks import assert_nothing_left, clones_of_run, facts, interrupt_pytest

# Records this process's database once, then the tests look at what they see in it.
_SUITE = """
import json, os, pathlib, time

import psycopg
import pytest

from corral._plugin._process import STATE

FACTS = pathlib.Path(os.environ["PC_FACTS"])


@pytest.fixture(autouse=True, scope="session")
def _record(request):
    db = request.config.stash[STATE].database
    (FACTS / f"process-{os.getpid()}.json").write_text(json.dumps({
        "pid": os.getpid(),
        "slot": db.slot,
        "precloned": db.precloned,
        "clone": db.timings["clone"],
        "recycled": db.recycled,
    }))


@pytest.mark.no_sandbox
def test_commit_then_die(corral_database_url, request):
    if not os.environ.get("PC_CRASH"):
        return
    with psycopg.connect(corral_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO item (name) VALUES ('ghost')")
    (FACTS / "crashed-slot").write_text(str(request.config.stash[STATE].database.slot))
    (FACTS / "crashed").write_text(str(os.getpid()))
    os._exit(3)  # before no_sandbox's recreation: the slot's database keeps the ghost


def _after_the_crash(slot):
    # With PC_CRASH, the other worker runs nothing until the crashed worker's replacement
    # has run a test: else, on a loaded machine, it drains the queue while the replacement
    # boots. (Run with --maxschedchunk=1, the queue stays with the controller meanwhile.)
    if not os.environ.get("PC_CRASH"):
        return
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        crashed = FACTS / "crashed-slot"
        if crashed.exists() and crashed.read_text():
            if int(crashed.read_text()) == slot or (FACTS / "replacement-ran").exists():
                return
        time.sleep(0.05)


@pytest.mark.parametrize("n", range(int(os.environ.get("PC_TESTS", "4"))))
def test_sees_only_the_seed(n, corral_database_url, request):
    slot = request.config.stash[STATE].database.slot
    _after_the_crash(slot)
    time.sleep(0.05)
    with psycopg.connect(corral_database_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM item ORDER BY id")]
    (FACTS / f"seen-{os.getpid()}-{n}.json").write_text(json.dumps(names))
    if os.environ.get("PC_CRASH") and (FACTS / "crashed").exists():
        (FACTS / "replacement-ran").touch()
    assert names == ["seed"]
"""

# Loaded with -p: workers import it before their database is acquired.
_BOOT_DELAY = """
import os, time

if os.environ.get("PYTEST_XDIST_WORKER"):
    time.sleep(float(os.environ.get("PC_BOOT_DELAY", "0")))
"""

# Loaded with -p in the controller: its background clones sleep (or fail). With
# PC_CLONE_UNTIL_SLOT, the clone first waits (up to 60 s) until that slot's worker has its
# own database (on a loaded machine, workers take longer to boot than any fixed delay),
# then sleeps, so the worker of the slot being cloned meanwhile waits for it.
_SLOW_CLONE = """
import json, os, pathlib, threading, time

from corral._plugin import _database

_real = _database.clone_database


def _slot_ready(facts, slot):
    for record in facts.glob("process-*.json"):
        try:
            if json.loads(record.read_text())["slot"] == slot:
                return True
        except ValueError:
            pass  # being written
    return False


def _clone(*args, **kwargs):
    if threading.current_thread().name == "corral-preclone":
        facts = pathlib.Path(os.environ["PC_FACTS"])
        (facts / "precloning").write_text("x")
        until = os.environ.get("PC_CLONE_UNTIL_SLOT")
        deadline = time.monotonic() + 60
        while until and not _slot_ready(facts, int(until)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(float(os.environ["PC_CLONE_DELAY"]))
    return _real(*args, **kwargs)


_database.clone_database = _clone


def pytest_sessionstart(session):
    # A worker records its database as soon as it has one, before collecting: xdist gives
    # no worker a test until every worker has collected, so the record the wait above looks
    # for would otherwise come only after the controller's clone (a 60 s wait every run).
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from corral._plugin._process import STATE

    db = session.config.stash[STATE].database
    if db is not None:
        record = {"pid": os.getpid(), "slot": db.slot, "precloned": db.precloned,
                  "clone": db.timings["clone"], "recycled": db.recycled}
        pathlib.Path(os.environ["PC_FACTS"], f"process-{os.getpid()}.json").write_text(
            json.dumps(record)
        )
"""


@pytest.fixture
def suite(inner: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recording suite in the sample's directory; returns where processes record."""
    inner.makepyfile(test_pc=_SUITE, boot_delay=_BOOT_DELAY, slow_clone=_SLOW_CLONE)
    records = inner.path / "records"
    records.mkdir()
    monkeypatch.setenv("PC_FACTS", str(records))
    monkeypatch.setenv("SAMPLE_FACTS", str(inner.path / "facts.json"))
    return records


def _processes(records: Path) -> dict[int, dict[str, Any]]:
    """``{pid: record}`` of every test process that ran a test."""
    found = (json.loads(p.read_text()) for p in records.glob("process-*.json"))
    return {r["pid"]: r for r in found}


def _workers(inner: pytest.Pytester, records: Path) -> dict[int, dict[str, Any]]:
    """``{slot: record}`` of the workers (the sample conftest records the controller)."""
    controller = int(facts(inner.path / "facts.json")["pid"])
    return {r["slot"]: r for r in _processes(records).values() if r["pid"] != controller}


def _run(inner: pytest.Pytester, *args: str) -> pytest.RunResult:
    return inner.runpytest_subprocess("-p", "no:randomly", "-v", *args, "test_pc.py")


@pytest.mark.slow
def test_workers_get_databases_the_controller_made(
    inner: pytest.Pytester, suite: Path, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PC_BOOT_DELAY", "1")  # the workers arrive after the clones
    result = _run(inner, "-n", "2", "-p", "boot_delay")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["pre-clone (2 databases): * ms", "broker: * requests, 0 keys, *"])
    workers = _workers(inner, suite)
    assert sorted(workers) == [1, 2]
    assert all(r["precloned"] and r["recycled"] == 0 for r in workers.values()), workers
    assert_nothing_left(facts(inner.path / "facts.json"), shared_server)


@pytest.mark.slow
def test_a_worker_arriving_mid_clone_waits_for_it(
    inner: pytest.Pytester, suite: Path, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The controller claims slot 1 at once and holds it for 4 s: its worker waits and
    # gets it; the other worker claims slot 2 before the controller and clones its own.
    monkeypatch.setenv("PC_CLONE_DELAY", "1")
    monkeypatch.setenv("PC_CLONE_UNTIL_SLOT", "2")  # and until slot 2's worker has cloned
    result = _run(inner, "-n", "2", "-p", "slow_clone")
    result.assert_outcomes(passed=5)
    # The name slot 2's worker claimed first leaves no key behind either.
    result.stdout.fnmatch_lines(["pre-clone (1 databases): * ms", "broker: * requests, 0 keys, *"])
    workers = _workers(inner, suite)
    assert sorted(workers) == [1, 2]
    assert workers[1]["precloned"], workers
    assert not workers[2]["precloned"], workers
    # It waited for the controller's clone instead of racing it.
    assert workers[1]["clone"][0] > 0.5, workers
    assert_nothing_left(facts(inner.path / "facts.json"), shared_server)


@pytest.mark.slow
def test_a_crashed_workers_replacement_gets_a_fresh_database(
    inner: pytest.Pytester, suite: Path, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PC_BOOT_DELAY", "1")
    monkeypatch.setenv("PC_CRASH", "1")
    monkeypatch.setenv("PC_TESTS", "60")
    # One test at a time from the controller's queue (see _after_the_crash).
    result = _run(inner, "-n", "2", "--maxschedchunk=1", "-p", "boot_delay")
    result.assert_outcomes(passed=60, failed=1)
    result.stdout.fnmatch_lines(["*corral: crashed workers*"])
    dead = int((suite / "crashed").read_text())
    processes = _processes(suite)
    slot = processes[dead]["slot"]
    assert processes[dead]["precloned"], "the dead worker did not use a pre-created database"
    replacements = [r for r in processes.values() if r["slot"] == slot and r["pid"] != dead]
    assert len(replacements) == 1, processes
    replacement = replacements[0]
    # It found the dead worker's database (with its committed ghost row) and recloned.
    assert not replacement["precloned"]
    assert replacement["recycled"] == 1
    seen = [json.loads(p.read_text()) for p in suite.glob(f"seen-{replacement['pid']}-*.json")]
    assert seen, "the replacement ran no test"
    assert all(names == ["seed"] for names in seen), seen
    assert_nothing_left(facts(inner.path / "facts.json"), shared_server)


@pytest.mark.slow
def test_a_failed_preclone_falls_back_to_the_workers(
    inner: pytest.Pytester, suite: Path, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database (not corral's: no mark, so no clean-up touches it) already has the name
    # of slot 1's clone: the controller's CREATE DATABASE fails for real.
    run_id = f"pc{secrets.token_hex(3)}"
    squatter = f"corral_{run_id}_1"
    with connect(shared_server) as conn:
        conn.execute(sql("CREATE DATABASE {}").format(ident(squatter)))
    try:
        monkeypatch.setenv("PC_BOOT_DELAY", "1")
        result = _run(inner, "-n", "2", "-p", "boot_delay", f"--corral-run-id={run_id}")
        result.assert_outcomes(passed=5)
        # Only that name is lost: slot 2's database is still made, and no key is left.
        result.stdout.fnmatch_lines(
            ["pre-clone (1 databases): * ms", "broker: * requests, 0 keys, *"]
        )
        workers = _workers(inner, suite)
        assert sorted(workers) == [1, 2]
        assert not workers[1]["precloned"], workers
        assert workers[2]["precloned"], workers
        assert workers[1]["recycled"] == 1  # slot 1's worker dropped the squatter
        names = {db.name for db in list_databases(shared_server)}
        assert squatter not in names
        assert_nothing_left(facts(inner.path / "facts.json"), shared_server)
    finally:
        drop_database(shared_server, squatter)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "ini"),
    [(("-n", "0"), ""), (("-n", "2"), "corral_database = off\n")],
    ids=["n0", "database-off"],
)
def test_no_preclone_without_workers_or_databases(
    inner: pytest.Pytester, suite: Path, args: tuple[str, ...], ini: str
) -> None:
    if ini:
        (inner.path / "pytest.ini").write_text(
            # pytest-asyncio >= 0.24 warns when the loop scope is unset: an error here.
            f"[pytest]\n{ini}filterwarnings = error\n"
            "asyncio_default_fixture_loop_scope = function\n"
        )
        inner.makepyfile(test_pc="def test_nothing():\n    pass\n")
        inner.makeconftest("")
    result = _run(inner, *args)
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*-- corral --*"])
    assert "pre-clone" not in result.stdout.str()


@pytest.mark.slow
def test_ctrl_c_during_a_preclone_leaves_no_database(
    inner: pytest.Pytester, suite: Path, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = f"pc{secrets.token_hex(3)}"
    monkeypatch.setenv("PC_CLONE_DELAY", "1.5")  # the clone lands after the Ctrl-C
    args = ["-n", "2", "-p", "slow_clone", f"--corral-run-id={run_id}", "test_pc.py"]
    code, out = interrupt_pytest(inner.path, args, suite / "precloning")
    assert code == pytest.ExitCode.INTERRUPTED, out
    # The controller waited for the clone in flight, then dropped it with the others.
    assert clones_of_run(shared_server, run_id) == [], out
    assert [n for n in (db.name for db in list_databases(shared_server)) if run_id in n] == []
