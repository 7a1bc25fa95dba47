"""Last one out: purge_if_last deletes a run's keys only when no other session lives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from corral.broker.redis import AsyncRedisClient, RedisClient
from tests.broker_spec.conftest import ROOT, wait_until

SESSION_TTL = 1.5


def run_keys(client: RedisClient) -> list[str]:
    return sorted(client._r.scan_iter(match=client.prefix + "*"))


def test_the_first_client_out_keeps_the_run_and_the_last_purges_it(
    redis_url: str, run: str
) -> None:
    first = RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL)
    last = RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL)
    with RedisClient(redis_url, run_id=run) as observer:
        first.join()
        last.join()
        first.set("built", "template-1", ttl=600)
        last.push("work", 1, 2)
        assert first.purge_if_last() is None  # `last` still works: nothing deleted
        assert last.get("built") == "template-1"
        assert len(observer.status()["sessions"]) == 1  # first's session ended
        deleted = last.purge_if_last()
        assert deleted is not None
        assert deleted > 0
        assert run_keys(observer) == []
        time.sleep(SESSION_TTL)  # several heartbeat intervals: none writes the run back
        first.close()
        last.close()
        assert run_keys(observer) == []


def test_a_client_that_never_joined_does_not_count(redis_url: str, run: str) -> None:
    with (
        RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as passive,
        RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as finisher,
    ):
        passive.set("k", 1, ttl=600)  # plain keys take no session
        finisher.join()
        assert finisher.purge_if_last() is not None
        assert run_keys(finisher) == []


_MEMBER = """
import sys, time
from corral.broker.redis import RedisClient

client = RedisClient(sys.argv[1], run_id=sys.argv[2], session_ttl=float(sys.argv[3]))
client.join()
client.set("from-the-child", 1, ttl=600)
print("joined", flush=True)
time.sleep(600)
"""


def test_a_dead_session_does_not_block_the_purge(redis_url: str, run: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _MEMBER, redis_url, run, str(SESSION_TTL)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    # No join() and no claim: this client has no session and no heartbeat, so nothing
    # reaps the dead one; only its deadline in the past tells it is dead.
    finisher = RedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "joined"
        assert finisher.purge_if_last() is None  # the child lives: the run is kept
        assert finisher.get("from-the-child") == 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        def expired() -> bool:
            sessions = finisher.status()["sessions"]
            return len(sessions) == 1 and sessions[0]["expires_in"] < 0

        wait_until(expired, 10, "the killed member's session to pass its deadline")
        deleted = finisher.purge_if_last()
        assert deleted is not None
        assert deleted > 0
        assert run_keys(finisher) == []
    finally:
        finisher.close()
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.asyncio
async def test_async_purge_if_last(redis_url: str, run: str) -> None:
    async with (
        AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as first,
        AsyncRedisClient(redis_url, run_id=run, session_ttl=SESSION_TTL) as last,
    ):
        await first.join()
        await last.join()
        await first.set("k", 1, ttl=600)
        assert await first.purge_if_last() is None
        assert await last.get("k") == 1
        assert await last.purge_if_last()
        assert await last.keys() == []
        assert (await last.status())["sessions"] == []
