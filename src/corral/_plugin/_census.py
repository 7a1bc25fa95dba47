"""A Redis run checked as a whole: every machine records the tests it owed and ran; the
last to finish names the tests no machine ran and the tests that ran on several.

Two writes per machine at its start and end (not one per test): a small state record
(``running`` / ``finished``, which the end-of-run report reads), and at the end one
record of node ids. The keys live under the run and go with it (``purge``, or a day).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.errors import BrokerError

if TYPE_CHECKING:
    from corral.broker.redis import RedisClient

__all__ = ["FINISHED_KEY", "Census", "Verdict", "judge"]

log = logging.getLogger("corral.pytest")

#: Counts the pytest invocations of a Redis run that have finished.
FINISHED_KEY = "corral:plugin:finished"
#: ``<prefix><tag>``: a machine's state, ``{"host", "hostname", "state"}``.
MACHINE_PREFIX = "corral:plugin:machine:"
#: ``<prefix><tag>``: a finished machine's tests, ``{"host", "shard", "due", "ran"}``.
TESTS_PREFIX = "corral:plugin:tests:"
_DAY = 24 * 3600.0


@dataclass(frozen=True)
class Verdict:
    """What the last machine found, over every machine's record.

    :ivar lost: node ids some machine owed the run (collected, not deselected by ``-k``,
        ``-m`` or another plugin; ``--corral-shard`` deselection still owes them) that no
        machine ran, sorted.
    :ivar twice: node id -> the machines that ran it, for tests that ran on more than one.
    :ivar machines: how many machines' records the verdict covers.
    :ivar tests: how many tests the run owed (the union of what machines owed).
    :ivar lost_shards: ``"K/N"`` of the shards none of whose tests ran, when the machines
        agree on N.
    """

    lost: list[str] = field(default_factory=list)
    twice: dict[str, list[str]] = field(default_factory=dict)
    machines: int = 0
    tests: int = 0
    lost_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.twice


def judge(records: Iterable[dict[str, Any]]) -> Verdict:
    """The verdict over the machines' *records* (``{"host", "shard", "due", "ran"}``)."""
    records = list(records)
    names = [str(r.get("host") or "?") for r in records]
    # Two invocations on one host (or with one CORRAL_HOST) must still be told apart.
    names = [
        f"{n} #{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)
    ]
    due: set[str] = set()
    ran_by: dict[str, list[str]] = {}
    for name, record in zip(names, records, strict=True):
        due.update(record.get("due") or ())
        for nodeid in record.get("ran") or ():
            ran_by.setdefault(nodeid, []).append(name)
    lost = sorted(due - ran_by.keys())
    twice = {nodeid: by for nodeid, by in sorted(ran_by.items()) if len(by) > 1}
    return Verdict(lost, twice, len(records), len(due), _lost_shards(records, lost, ran_by))


def _lost_shards(
    records: list[dict[str, Any]], lost: list[str], ran_by: dict[str, list[str]]
) -> list[str]:
    from corral._plugin._shard import shard_of

    counts = {tuple(r["shard"])[1] for r in records if r.get("shard")}
    if not lost or len(counts) != 1:
        return []
    (count,) = counts
    missing = {shard_of(nodeid, count) for nodeid in lost}
    ran = {shard_of(nodeid, count) for nodeid in ran_by}
    return [f"{k}/{count}" for k in sorted(missing - ran)]


@dataclass
class Census:
    """This machine's part in checking the run (the controller's, with a Redis broker).

    :ivar tag: this controller's token (the one in its clones' names): unique in the run
        even when two invocations share a host.
    :ivar finished: this machine's place among the finished (``FINISHED_KEY``), once counted.
    :ivar others: the other machines' states, as read when this one finished.
    """

    client: RedisClient
    tag: str
    host: str
    machines: int | None = None
    shard: tuple[int, int] | None = None
    finished: int | None = None
    others: list[dict[str, Any]] = field(default_factory=list)

    def _state(self, state: str) -> dict[str, Any]:
        return {"host": self.host, "hostname": socket.gethostname(), "state": state}

    def start(self) -> None:
        """Record this machine as running (the report of another machine says so).

        :raises BrokerError: Redis did not take it.
        """
        self.client.set(MACHINE_PREFIX + self.tag, self._state("running"), ttl=_DAY)

    def count_out(self) -> int:
        """Count this machine as finished (once); returns how many have finished."""
        if self.finished is None:
            self.finished = self.client.incr(FINISHED_KEY, ttl=_DAY)
        return self.finished

    def finish(self, due: Iterable[str], ran: Iterable[str]) -> Verdict | None:
        """Record what this machine owed and ran, count it out; the last machine judges.

        Last: the ``--corral-machines``-th to finish, or without that count the one whose
        count reaches the number of machines that recorded a start (a machine that starts
        after that finds an empty run). Never raises: the check must not hide the run's
        own result (a Redis error is logged and there is no verdict).

        :returns: the verdict when this machine is the last, else None.
        """
        try:
            record = {
                "host": self.host,
                "shard": list(self.shard) if self.shard else None,
                "due": sorted(set(due)),
                "ran": sorted(set(ran)),
            }
            self.client.set(TESTS_PREFIX + self.tag, record, ttl=_DAY)
            self.client.set(MACHINE_PREFIX + self.tag, self._state("finished"), ttl=_DAY)
            finished = self.count_out()
            keys = self.client.keys()
            states = [
                state
                for key in keys
                if key.startswith(MACHINE_PREFIX) and key != MACHINE_PREFIX + self.tag
                for state in [self.client.get(key, None)]
                if isinstance(state, dict)
            ]
            self.others = states
            last = finished >= (self.machines or len(states) + 1)
            if not last:
                return None
            records = [
                value
                for key in keys
                if key.startswith(TESTS_PREFIX)
                for value in [self.client.get(key, None)]
                if isinstance(value, dict)
            ]
        except BrokerError as exc:
            log.warning("corral: could not check the Redis run's tests: %s", exc)
            return None
        return judge(records)

    def running(self) -> list[dict[str, Any]]:
        """The other machines that had not finished when this one did."""
        return [s for s in self.others if s.get("state") == "running"]
