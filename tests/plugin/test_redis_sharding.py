"""A suite sharded over machines that share one Redis run loses no test, and says so if it does.

Each inner pytest invocation is a "machine" (told apart by ``CORRAL_HOST``); pytest-randomly
(in corral's dev extra) is on in all of them, so each collects in its own order. No database:
the broker part is what sharding concerns.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections import Counter
from pathlib import Path

import pytest

from corral._plugin._shard import shard_of
from tests._inner import RUN_VARIABLES, inner_env, start_pytest
from tests.plugin._checks import redis_keys

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "redis.md"

_SUITE = """
import os

import pytest


def _ran(request):
    with open(os.environ["RAN"], "a") as out:
        out.write(os.environ["CORRAL_HOST"] + " " + request.node.nodeid + "\\n")


@pytest.mark.parametrize("n", range(30))
def test_n(n, request):
    _ran(request)


@pytest.mark.parametrize("word", ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
def test_word(word, request):
    _ran(request)


def test_excluded(request):
    _ran(request)
"""

_CONFTEST = """
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def machines_meet(corral):
    # Every machine is running before any finishes (without --corral-machines, a machine
    # that starts after the others left would start a fresh run).
    if os.environ.get("MEET"):
        corral.barrier("meet", int(os.environ["MEET"]), timeout=60)
"""

SUITE = [f"test_suite.py::test_n[{n}]" for n in range(30)] + [
    f"test_suite.py::test_word[{w}]" for w in "abcdefghij"
]
EXCLUDED = "test_suite.py::test_excluded"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inner runs start runs of their own, not join (or reuse the broker of) this one.
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> Path:
    pytester.makepyfile(test_suite=_SUITE, conftest=_CONFTEST)
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    return pytester.path


def _run(cwd: Path, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = start_pytest(cwd, args, env)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _ran(path: Path) -> list[tuple[str, str]]:
    """``(machine, node id)`` of every test that ran, in order."""
    if not path.exists():
        return []
    return [(m, n) for m, _, n in (line.partition(" ") for line in path.read_text().splitlines())]


def _purge(url: str, run_id: str) -> None:
    from corral.broker.redis import RedisClient

    with RedisClient(url, run_id=run_id) as client:
        client.purge()


def docs_recipe() -> tuple[list[int], str]:
    """The shards of docs/redis.md's CI job and its pytest command (folded lines joined)."""
    text = DOCS.read_text()
    job = text[text.index("```yaml") :]
    job = job[: job.index("```", 3)]
    shards = [int(s) for s in re.search(r"shard: \[([\d, ]+)\]", job)[1].split(",")]  # type: ignore[index]
    folded = re.search(r"- run: >-\n((?: {10}.*\n)+)", job)
    assert folded is not None, "the recipe's pytest step moved"
    return shards, " ".join(line.strip() for line in folded[1].splitlines())


# Four pytest invocations (six processes with the workers) at once: ~80 s on a loaded
# 2-core machine, too close to the suite's 120 s default.
@pytest.mark.timeout(300)
def test_the_docs_recipe_runs_every_test_exactly_once(suite: Path, redis_url: str) -> None:
    shards, command = docs_recipe()
    assert command.startswith("pytest ")
    assert "${{ matrix.shard }}" in command
    run_id = f"shard-{secrets.token_hex(4)}"
    variables = {"CORRAL_BROKER_URL": redis_url, "CORRAL_RUN_ID": run_id}
    procs = []
    for shard in shards:
        line = command.replace("${{ matrix.shard }}", str(shard))
        args = [re.sub(r"\$(\w+)", lambda m: variables[m[1]], arg) for arg in shlex.split(line)[1:]]
        if shard > 2:  # two machines as written (-n 2); two without workers, to spare the CPU
            args[args.index("-n") + 1] = "0"
        host = f"machine-{shard}"
        # --corral-machines 4: no need to meet, the 4th to finish checks the run.
        env = inner_env(CORRAL_HOST=host, RAN=str(suite / "ran.txt"))
        procs.append((host, start_pytest(suite, args, env)))
    try:
        outputs = {host: proc.communicate(timeout=240)[0] for host, proc in procs}
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for host, proc in procs:
        assert proc.returncode == 0, outputs[host]
        assert "corral error" not in outputs[host]
        assert "corral warning" not in outputs[host]
    seeds = {re.search(r"--randomly-seed=(\d+)", out)[1] for out in outputs.values()}  # type: ignore[index]
    assert len(seeds) > 1, "pytest-randomly: every machine collects in its own order"
    ran = _ran(suite / "ran.txt")
    counts = Counter(nodeid for _, nodeid in ran)
    assert sorted(counts) == sorted([*SUITE, EXCLUDED])
    assert set(counts.values()) == {1}, [n for n, c in counts.items() if c > 1]
    for machine, nodeid in ran:  # each on the machine of its shard
        assert machine == f"machine-{shard_of(nodeid, len(shards))}"
    assert redis_keys(redis_url, run_id) == []  # the last of 4 deleted the run


@pytest.mark.parametrize("machines", [True, False], ids=["with-machines", "without"])
def test_a_shard_no_machine_ran_is_named(suite: Path, redis_url: str, machines: bool) -> None:
    # Shards 1 and 2 of 3 run; 3 does not. Machine A (-n 2 with --corral-machines: what it
    # owes comes from its workers) deselects test_excluded with -k: owed by nobody, not lost.
    # Machine B runs only test_n (-k): the test_word tests of its shard 2 are owed by A alone
    # (it collected them, its shard cut them), so they are lost too.
    run_id = f"skip-{secrets.token_hex(4)}"
    args = ["--corral-broker", redis_url, "--corral-run-id", run_id]
    meet: dict[str, str] = {}
    if machines:
        args += ["--corral-machines", "2"]
    else:
        meet = {"MEET": "2"}  # both running before either finishes (see the conftest)
    ran_file = str(suite / "ran.txt")
    a = start_pytest(
        suite,
        [*args, "-n", "2" if machines else "0", "-k", "not excluded", "--corral-shard", "1/3"],
        inner_env(CORRAL_HOST="machine-a", RAN=ran_file, **meet),
    )
    # Machine B takes its shard from the environment, as a CI job may.
    b_env = inner_env(CORRAL_HOST="machine-b", RAN=ran_file, CORRAL_SHARD="2/3", **meet)
    b = start_pytest(suite, [*args, "-n", "0", "-k", "test_n"], b_env)
    try:
        out_a, _ = a.communicate(timeout=120)
        out_b, _ = b.communicate(timeout=120)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        _purge(redis_url, run_id)
    words = [n for n in SUITE if "test_word" in n]
    lost = sorted(n for n in SUITE if shard_of(n, 3) == 3 or (n in words and shard_of(n, 3) == 2))
    assert any(n in words and shard_of(n, 3) == 2 for n in lost), "a word in shard 2"
    kind = "error" if machines else "warning"
    # Whichever finished last reports, once; the other says nothing of the kind.
    reports = [out for out in (out_a, out_b) if f"corral {kind}:" in out]
    assert len(reports) == 1, out_a + out_b
    (out,) = reports
    lines = pytest.LineMatcher(out.splitlines())
    lines.fnmatch_lines(
        [f"*corral {kind}: {len(lost)} test(s) ran on no machine*", *lost,
         f"Of the {len(SUITE)} tests owed by 2 machine(s) of the Redis run, these ran nowhere "
         "(no machine ran shard 3/3)*"]
    )  # fmt: skip
    assert EXCLUDED not in out
    assert "more than one machine" not in out
    last, first = (b, a) if out is out_b else (a, b)
    assert first.returncode == 0
    assert last.returncode == (1 if machines else 0), out
    if machines:
        lines.fnmatch_lines(["The run fails: --corral-machines says it is complete."])
    assert sorted(n for _, n in _ran(suite / "ran.txt")) == sorted(set(SUITE) - set(lost))


def test_a_test_run_on_two_machines_is_named(suite: Path, redis_url: str) -> None:
    # Machine B was given no shard: it runs machine A's share again.
    run_id = f"twice-{secrets.token_hex(4)}"
    args = ["-n", "0", "--corral-broker", redis_url, "--corral-run-id", run_id,
            "--corral-machines", "2"]  # fmt: skip
    ran = str(suite / "ran.txt")
    try:
        code_a, out_a = _run(
            suite, [*args, "--corral-shard", "1/2"], inner_env(CORRAL_HOST="machine-a", RAN=ran)
        )
        assert code_a == 0, out_a
        assert "corral error" not in out_a  # one of two: not the last
        code_b, out_b = _run(suite, args, inner_env(CORRAL_HOST="machine-b", RAN=ran))
    finally:
        _purge(redis_url, run_id)
    assert code_b == 1, out_b
    twice = sorted(n for n in [*SUITE, EXCLUDED] if shard_of(n, 2) == 1)
    pytest.LineMatcher(out_b.splitlines()).fnmatch_lines(
        [f"*corral error: {len(twice)} test(s) ran on more than one machine*",
         *(f"{n} (on machine-a, machine-b)" for n in twice)]
    )  # fmt: skip
    assert "ran on no machine" not in out_b


def test_what_a_running_machine_holds_is_not_a_leak(
    pytester: pytest.Pytester, redis_url: str
) -> None:
    # Machine A holds a lock while machine B finishes: B's report says A is still running.
    wait_for = """
        import os
        import time
        from pathlib import Path

        def wait_for(path):
            deadline = time.monotonic() + 60
            while not Path(path).exists():
                assert time.monotonic() < deadline, f"{path} never appeared"
                time.sleep(0.05)
        """
    pytester.makepyfile(
        waiting=wait_for,
        test_hold="""
        import os
        from pathlib import Path

        from waiting import wait_for

        def test_hold(corral):
            with corral.lock("migrations", ttl=600):
                Path(os.environ["HOLDING"]).touch()
                wait_for(os.environ["GO"])
        """,
        test_wait="""
        import os

        from waiting import wait_for

        def test_wait():
            wait_for(os.environ["HOLDING"])
        """,
    )
    pytester.makeini(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    run_id = f"held-{secrets.token_hex(4)}"
    holding, go = str(pytester.path / "holding"), str(pytester.path / "go")
    args = ["-n", "0", "--corral-broker", redis_url, "--corral-run-id", run_id]
    env = {"HOLDING": holding, "GO": go}
    a = start_pytest(
        pytester.path, [*args, "test_hold.py"], inner_env(CORRAL_HOST="machine-a", **env)
    )
    try:
        code_b, out_b = _run(
            pytester.path, [*args, "test_wait.py"], inner_env(CORRAL_HOST="machine-b", **env)
        )
        Path(go).touch()
        out_a, _ = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
        _purge(redis_url, run_id)
    assert code_b == 0, out_b
    lines = pytest.LineMatcher(out_b.splitlines())
    lines.fnmatch_lines(
        ["*corral warning: still held in the Redis run (all machines)*",
         "lock 'migrations' (1) held by machine-a, which is still running "
         "('machine-a/main', for * s)",
         "Machines still running hold these: they give them back when their tests end."]
    )  # fmt: skip
    assert "never gave them back" not in out_b
    assert a.returncode == 0, out_a
    assert "still held" not in out_a  # A released its lock before it finished
    assert "corral warning" not in out_a  # A was last: every test ran once


def test_a_shard_left_empty_passes(pytester: pytest.Pytester) -> None:
    # No Redis needed: the split is local. The one test is in shard 2 of 2.
    pytester.makepyfile(test_one="def test_a(): pass")
    assert shard_of("test_one.py::test_a", 2) == 2
    empty = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--corral-shard", "1/2")
    assert empty.ret == pytest.ExitCode.OK
    empty.stdout.fnmatch_lines(["*1 deselected*"])
    full = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--corral-shard", "2/2")
    full.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--corral-shard", "0/4"], {}, "*--corral-shard must be K/N with 1 <= K <= N*'0/4'*"),
        ([], {"CORRAL_SHARD": "5/4"}, "*CORRAL_SHARD must be K/N*'5/4'*"),
        (["-o", "corral_shard=2"], {}, "*ini corral_shard must be K/N*'2'*"),
    ],
    ids=["option", "env", "ini"],
)
def test_a_malformed_shard_is_a_usage_error(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile("def test_never(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
