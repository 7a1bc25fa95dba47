"""``--corral-shard K/N``, the run check's verdict and the report's "which is still running",
as pure functions (no pytest run)."""

from __future__ import annotations

import random
import socket

import pytest

from corral._plugin._census import judge
from corral._plugin._report import _running_machine
from corral._plugin._settings import parse_shard
from corral._plugin._shard import shard_of, split


@pytest.mark.parametrize(
    ("text", "shard"), [("1/4", (1, 4)), ("4/4", (4, 4)), (" 2/3 ", (2, 3)), ("1/1", (1, 1))]
)
def test_shards_count_from_one(text: str, shard: tuple[int, int]) -> None:
    assert parse_shard(text) == shard


@pytest.mark.parametrize("text", ["0/4", "5/4", "4", "a/b", "1/0", "-1/2", "", "1/2/3"])
def test_malformed_shards_are_usage_errors(text: str) -> None:
    with pytest.raises(pytest.UsageError, match=r"CORRAL_SHARD must be K/N with 1 <= K <= N"):
        parse_shard(text, "CORRAL_SHARD")


def test_a_tests_shard_is_pinned() -> None:
    # Machines of one run may run different corral versions: the hash must not change.
    assert [shard_of("tests/test_app.py::test_create", n) for n in (1, 2, 3, 4, 7)] == [
        1,
        2,
        1,
        4,
        4,
    ]
    assert [shard_of("tests/test_app.py::test_list[2]", n) for n in (2, 3, 4, 7)] == [2, 2, 4, 2]


class _Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid


def test_the_shards_partition_the_suite_whatever_the_order() -> None:
    ids = [f"tests/test_{m}.py::test_{t}[{p}]" for m in range(5) for t in range(6) for p in "ab"]
    found: list[str] = []
    for k in range(1, 5):
        order = ids[:]
        random.Random(k).shuffle(order)  # each machine collects in its own order
        kept, dropped = split([_Item(i) for i in order], (k, 4))
        assert [i.nodeid for i in kept] == [i for i in order if shard_of(i, 4) == k]
        assert len(kept) + len(dropped) == len(ids)
        assert kept, "60 tests: every one of 4 shards gets some"
        found += [i.nodeid for i in kept]
    assert sorted(found) == sorted(ids)  # each test in exactly one shard


def test_verdict_names_lost_and_twice_run_tests() -> None:
    verdict = judge(
        [
            {"host": "a", "shard": [1, 3], "due": ["t1", "t2", "t3"], "ran": ["t1"]},
            {"host": "b", "shard": [2, 3], "due": ["t1", "t2", "t3"], "ran": ["t1", "t2"]},
        ]
    )
    assert verdict.lost == ["t3"]
    assert verdict.twice == {"t1": ["a", "b"]}
    assert (verdict.machines, verdict.tests, verdict.ok) == (2, 3, False)


def test_what_every_machine_deselected_is_not_lost() -> None:
    # -k/-m (or another plugin) deselected "slow" before the shard: no machine owed it.
    # A machine that collected less (another directory) still owes what it collected.
    verdict = judge(
        [
            {"host": "a", "shard": None, "due": ["t1"], "ran": ["t1"]},
            {"host": "b", "shard": None, "due": ["t2", "t3"], "ran": ["t2", "t3"]},
        ]
    )
    assert verdict.ok
    assert verdict.tests == 3


def test_machines_sharing_a_name_are_told_apart() -> None:
    verdict = judge(
        [
            {"host": "ci", "due": ["t1"], "ran": ["t1"]},
            {"host": "ci", "due": ["t1"], "ran": ["t1"]},
        ]
    )
    assert verdict.twice == {"t1": ["ci #1", "ci #2"]}


def test_verdict_names_the_shard_nobody_ran() -> None:
    ids = [f"t{i}" for i in range(40)]
    ran = [i for i in ids if shard_of(i, 3) != 3]
    records = [{"host": "a", "shard": [1, 3], "due": ids, "ran": ran}]
    verdict = judge(records)
    assert verdict.lost == sorted(i for i in ids if shard_of(i, 3) == 3)
    assert verdict.lost_shards == ["3/3"]


def test_a_holder_is_matched_to_a_machine_still_running() -> None:
    running = [
        {"host": "machine-a", "hostname": socket.gethostname(), "state": "running"},
        {"host": "runner-2", "hostname": "ci-vm-17", "state": "running"},
    ]
    # The plugin's names carry the machine (CORRAL_HOST): "machine-a/gw0".
    assert _running_machine({"machine": "machine-a", "hostname": "x"}, running) == "machine-a"
    assert _running_machine({"machine": "machine-c", "hostname": "ci-vm-17"}, running) is None
    # A plain client's holder has only the host name: enough on another host...
    assert _running_machine({"machine": None, "hostname": "ci-vm-17"}, running) == "runner-2"
    # ...not on this one, where this (finished) machine's processes live too.
    here = {"machine": None, "hostname": socket.gethostname()}
    assert _running_machine(here, running) is None
    assert _running_machine({"machine": "machine-a"}, []) is None
