"""Co-location: a test process and its database backends pinned to one CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from corral._plugin._colocate import (
    Colocation,
    checks_at,
    decide,
    may_pin,
    postmaster_pid,
)
from corral._plugin._cpuclaim import claim_cpu, preference
from corral._plugin._settings import empty_schema
from corral.postgres import (
    EphemeralPostgres,
    clone_database,
    database_dsn,
    drop_database,
    ensure_template,
)

linux = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only"
)


def _cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


two_cpus = pytest.mark.skipif(len(_cpus()) < 2, reason="co-location needs 2 CPUs")


# ---------------------------------------------------------------------- decisions


def test_checks_every_test_at_first_then_every_sixteenth() -> None:
    assert [n for n in range(1, 70) if checks_at(n)] == [1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 48, 64]


def test_workers_start_at_their_own_cpu_and_try_the_others_after_it() -> None:
    assert [preference({4, 2, 7}, i)[0] for i in range(5)] == [2, 4, 7, 2, 4]
    assert preference({4, 2, 7}, 1) == [4, 7, 2]
    assert preference(set(), 3) == []


@pytest.mark.parametrize(
    ("mode", "supported", "postmaster", "processes", "cpus", "on", "why"),
    [
        ("auto", True, 10, 1, 2, True, ""),
        ("auto", True, 10, 2, 2, True, ""),
        ("auto", True, 10, 4, 2, False, "4 test processes for 2 CPUs"),
        ("on", True, 10, 4, 2, True, ""),
        ("off", True, 10, 1, 2, False, "corral_colocate = off"),
        ("on", False, 10, 1, 2, False, "Linux-only"),
        ("on", True, None, 1, 2, False, "postmaster is not visible"),
        ("on", True, 10, 1, 1, False, "one CPU"),
        ("on", True, 10, 1, 2, False, "another user"),
    ],
)
def test_decide(
    mode: str,
    supported: bool,
    postmaster: int | None,
    processes: int,
    cpus: int,
    on: bool,
    why: str,
) -> None:
    got, reason = decide(
        mode,
        supported=supported,
        postmaster=postmaster,
        processes=processes,
        cpus=cpus,
        permitted=why != "another user",
    )
    assert got is on
    assert why in reason


# ---------------------------------------------------------------------- against a server


@linux
def test_current_cpu_is_where_the_thread_runs() -> None:
    for cpu in sorted(_cpus())[:2]:
        out = subprocess.run(
            [sys.executable, "-c", "from corral._plugin._colocate import current_cpu\n"
             f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(current_cpu())"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert int(out.stdout) == cpu


def test_may_pin_own_and_foreign_processes() -> None:
    assert may_pin(os.getpid())
    assert not may_pin(2**22 + 12345)  # no such process
    assert may_pin(1) is (os.geteuid() == 0)  # init belongs to root


def test_postmaster_pid_of_a_local_server(postgres_dsn: str) -> None:
    params = conninfo_to_dict(postgres_dsn)
    if not str(params.get("host", "")).startswith("/"):
        pytest.skip("CORRAL_TEST_DSN connects over TCP: no lock file to read")
    pid = postmaster_pid(params)
    assert pid is not None
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() in ("postgres", "postmaster")


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "params",
    [
        {"host": "127.0.0.1", "port": "UNUSED"},  # nobody listens there
        {"host": "db.example", "port": "5432"},  # another machine: never ours to pin
        {"host": "/nonexistent/dir", "port": "5432"},
        {"host": "/tmp", "port": "not-a-port"},
        {},
    ],
)
def test_no_postmaster_without_a_local_server_to_verify(params: dict[str, str]) -> None:
    if params.get("port") == "UNUSED":
        params = {**params, "port": str(_unused_port())}
    assert postmaster_pid(params) is None


def test_a_port_held_by_another_program_names_no_postmaster() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert postmaster_pid({"host": "127.0.0.1", "port": str(sock.getsockname()[1])}) is None


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[EphemeralPostgres]:
    with EphemeralPostgres(tcp=True) as server:
        yield server


@linux
def test_postmaster_pid_over_the_loopback(tcp_server: EphemeralPostgres) -> None:
    for host in ("127.0.0.1", "localhost"):
        assert postmaster_pid({"host": host, "port": str(tcp_server.port)}) == tcp_server.pid
    assert postmaster_pid(conninfo_to_dict(tcp_server.tcp_dsn)) == tcp_server.pid


@linux
@two_cpus
def test_backends_connected_over_tcp_are_pinned(tcp_server: EphemeralPostgres) -> None:
    admin = tcp_server.tcp_dsn
    template = ensure_template(admin, empty_schema)
    name = clone_database(admin, template)
    try:
        colocation, why = Colocation.plan("on", admin, name, "gw0", 1)
        assert colocation is not None, why
        with psycopg.connect(tcp_server.tcp_dsn_for(name)) as app:
            assert app.info.hostaddr == "127.0.0.1"
            try:
                colocation.start()
                assert colocation.pin_backends() == 1
                assert os.sched_getaffinity(app.info.backend_pid) == {colocation.cpu}
            finally:
                colocation.stop()
    finally:
        drop_database(admin, name)


@pytest.fixture
def scratch_db(postgres_dsn: str) -> Iterator[tuple[str, str]]:
    template = ensure_template(postgres_dsn, empty_schema)
    name = clone_database(postgres_dsn, template)
    try:
        yield name, database_dsn(postgres_dsn, name)
    finally:
        drop_database(postgres_dsn, name)


@linux
@two_cpus
def test_backends_of_the_database_are_pinned_and_the_process_restored(
    postgres_dsn: str, scratch_db: tuple[str, str]
) -> None:
    params = conninfo_to_dict(postgres_dsn)
    postmaster = postmaster_pid(params)
    if postmaster is None:
        pytest.skip("the test server is not local through a Unix socket")
    name, url = scratch_db
    cpu = max(_cpus())
    before = os.sched_getaffinity(0)
    with psycopg.connect(url) as app, psycopg.connect(postgres_dsn) as other:
        colocation = Colocation(postgres_dsn, name, cpu, postmaster)
        try:
            colocation.start()
            assert os.sched_getaffinity(0) == {cpu}
            seen: list[set[int]] = []
            thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            thread.start()
            thread.join()
            assert seen == [{cpu}]  # threads started later inherit the pin
            assert colocation.pin_backends() == 1
            assert os.sched_getaffinity(app.info.backend_pid) == {cpu}
            assert os.sched_getaffinity(other.info.backend_pid) != {cpu}  # other database
            assert colocation.pin_backends() == 0  # already pinned
        finally:
            colocation.stop()
        assert os.sched_getaffinity(0) == before
        colocation.stop()  # idempotent
        assert colocation.failed == "stopped"


@linux
def test_a_failing_lookup_gives_up_without_failing(postgres_dsn: str) -> None:
    def broken(dsn: str) -> psycopg.Connection:
        raise psycopg.OperationalError("no server here")

    before = os.sched_getaffinity(0)
    colocation = Colocation(postgres_dsn, "nothing", min(_cpus()), 1, connect=broken)
    colocation.start()
    assert colocation.pin_backends() == 0
    assert "cannot list the database's backends" in colocation.failed
    assert os.sched_getaffinity(0) == before  # giving up gave the CPUs back


# ---------------------------------------------------------------------- in a pytest run

_AFFINITY_TEST = """
import json, os

import psycopg


def test_where(corral_database_url):
    with psycopg.connect(corral_database_url) as conn:
        conn.execute("SELECT 1")
        backend = conn.info.backend_pid
        first = os.sched_getaffinity(backend)
    # a backend that appeared during this test is pinned before the next one
    with open(os.environ["AFFINITY_OUT"], "a") as out:
        out.write(json.dumps({
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "me": sorted(os.sched_getaffinity(0)),
            "backend_at_start": sorted(first),
        }) + "\\n")


def test_app_backend(corral_database_url):
    import app
    backend = app.conn.info.backend_pid
    with open(os.environ["AFFINITY_OUT"], "a") as out:
        out.write(json.dumps({
            "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
            "me": sorted(os.sched_getaffinity(0)),
            "app_backend": sorted(os.sched_getaffinity(backend)),
        }) + "\\n")
"""

_APP = """
import os

import psycopg

conn = psycopg.connect(os.environ["CORRAL_DATABASE_URL"], autocommit=True)
"""


@pytest.fixture
def affinity_suite(
    pytester: pytest.Pytester, shared_server: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    if postmaster_pid(conninfo_to_dict(shared_server)) is None:
        pytest.skip("the test server is not local through a Unix socket")
    from tests._inner import RUN_VARIABLES

    for name in (*RUN_VARIABLES, "CORRAL_COLOCATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORRAL_DSN", shared_server)
    monkeypatch.setenv("AFFINITY_OUT", str(pytester.path / "affinity.jsonl"))
    # CPU claims of its own (tests/conftest.py gives the suite's inner runs a directory
    # apart from the machine's; this one is apart from the other inner runs' too).
    claims = pytester.mkdir("cpu-claims")
    monkeypatch.setenv("CORRAL_CPU_CLAIMS", str(claims))
    # Opted in: co-location is off by default (the app sees its affinity).
    pytester.makeini("[pytest]\ncorral_database = on\ncorral_colocate = auto\n")
    pytester.makepyfile(app=_APP, test_affinity=_AFFINITY_TEST)
    pytester.makeconftest("import app  # the app connects at import, as apps do\n")
    return pytester


def _records(pytester: pytest.Pytester) -> list[dict[str, list[int] | str]]:
    lines = (pytester.path / "affinity.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@linux
@two_cpus
@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_each_test_process_shares_its_cpu_with_its_backends(
    affinity_suite: pytest.Pytester, workers: str
) -> None:
    result = affinity_suite.runpytest_subprocess("-n", workers, "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*co-located (corral_colocate): *on CPU * with * backends*"])
    records = _records(affinity_suite)
    assert len(records) == 2
    for record in records:
        assert len(record["me"]) == 1, record
        if "app_backend" in record:
            assert record["app_backend"] == record["me"], record
    if workers == "2" and len({r["worker"] for r in records}) == 2:
        assert records[0]["me"] != records[1]["me"]  # a CPU of its own each


@linux
@two_cpus
@pytest.mark.slow
def test_on_the_throwaway_server_tcp_backends_share_the_cpu(
    affinity_suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORRAL_DSN")  # corral's own server
    # The URL without its socket directory (what asyncpg, Django or a URL built from
    # parts use): the app connects over TCP.
    app = _APP.replace('["CORRAL_DATABASE_URL"]', '["CORRAL_DATABASE_URL"].split("?")[0]')
    affinity_suite.makepyfile(app=app + "assert conn.info.hostaddr == '127.0.0.1'\n")
    result = affinity_suite.runpytest_subprocess("-n", "0", "-p", "no:randomly", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*co-located (corral_colocate): *on CPU * with * backends*"])
    for record in _records(affinity_suite):
        assert len(record["me"]) == 1, record
        if "app_backend" in record:
            assert record["app_backend"] == record["me"], record


@linux
@two_cpus
@pytest.mark.slow
@pytest.mark.parametrize("how", ["default", "off"])
def test_by_default_or_off_nothing_is_pinned(affinity_suite: pytest.Pytester, how: str) -> None:
    # What the app sees of its CPUs (os.sched_getaffinity, and what sizes pools by it:
    # os.process_cpu_count, joblib...) is what it would see without corral.
    if how == "default":
        affinity_suite.makeini("[pytest]\ncorral_database = on\n")
    args = ["--corral-colocate=off"] if how == "off" else []
    result = affinity_suite.runpytest_subprocess("-n", "0", "-v", *args)
    result.assert_outcomes(passed=2)
    assert "co-located" not in result.stdout.str()
    for record in _records(affinity_suite):
        assert set(record["me"]) == _cpus()
        if "app_backend" in record:
            assert len(record["app_backend"]) > 1


@pytest.mark.slow
def test_a_bad_value_is_a_usage_error(affinity_suite: pytest.Pytester) -> None:
    affinity_suite.makeini("[pytest]\ncorral_database = on\ncorral_colocate = sometimes\n")
    result = affinity_suite.runpytest_subprocess("-n", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini corral_colocate must be auto, on or off, not 'sometimes'*"])


_SIDE_BY_SIDE = """
import json, os, time
from pathlib import Path


def test_where(corral_database_url):
    barrier = Path(os.environ["BARRIER"])
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # both runs are pinned before either test ends
    with open(os.environ["AFFINITY_OUT"], "a") as out:
        out.write(json.dumps({"me": sorted(os.sched_getaffinity(0))}) + "\\n")
"""


@linux
@two_cpus
@pytest.mark.slow
def test_two_runs_side_by_side_pin_to_different_cpus(
    affinity_suite: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory
) -> None:
    affinity_suite.makepyfile(test_affinity=_SIDE_BY_SIDE)
    barrier = tmp_path_factory.mktemp("barrier")
    env = {**os.environ, "BARRIER": str(barrier)}  # the fixture's own CPU claims
    command = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:randomly", "-v", "-v"]
    runs = [
        subprocess.Popen(
            command, cwd=affinity_suite.path, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    cpus = [record["me"] for record in _records(affinity_suite)]
    assert len(cpus) == 2, cpus
    assert all(len(c) == 1 for c in cpus), cpus
    assert cpus[0] != cpus[1]  # each run's process claimed a CPU of its own
    for output in outputs:
        assert "co-located (corral_colocate): main on CPU" in output


@linux
@two_cpus
def test_with_every_cpu_claimed_elsewhere_auto_does_not_pin(
    postgres_dsn: str, scratch_db: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if postmaster_pid(conninfo_to_dict(postgres_dsn)) is None:
        pytest.skip("the test server is not local through a Unix socket")
    monkeypatch.setenv("CORRAL_CPU_CLAIMS", str(tmp_path))
    name, _ = scratch_db
    cpus = sorted(_cpus())
    before = os.sched_getaffinity(0)
    # Planning claims nothing (an xdist controller plans but runs no test).
    planned, _ = Colocation.plan("auto", postgres_dsn, name, "gw1", 1)
    assert planned is not None
    assert planned.claim is None
    others = [claim_cpu([cpu]) for cpu in cpus]  # another run's processes
    try:
        assert all(c is not None and c.held for c in others)
        planned.start()
        assert "taken by test processes of other corral runs" in planned.failed
        assert os.sched_getaffinity(0) == before
        forced, why = Colocation.plan("on", postgres_dsn, name, "gw1", 1)
        assert forced is not None
        assert why == ""
        forced.start()
        try:
            assert os.sched_getaffinity(0) == {cpus[1]}  # pinned where it would have been
            assert forced.claim is not None
            assert not forced.claim.held
        finally:
            forced.stop()
    finally:
        for claim in others:
            if claim is not None:
                claim.release()
    mine, _ = Colocation.plan("auto", postgres_dsn, name, "gw1", 1)
    assert mine is not None
    mine.start()
    try:
        assert mine.claim is not None
        assert mine.claim.held
        assert mine.cpu == cpus[1]
        assert os.sched_getaffinity(0) == {cpus[1]}
    finally:
        mine.stop()
    again = claim_cpu([cpus[1]])  # stop() gave the CPU back to other runs
    assert again is not None
    assert again.held
    again.release()
    assert os.sched_getaffinity(0) == before
