"""The async checkout lock: the holder-only fast path hands over to a queue at the first
contention, in order, with bounded waits. Pure asyncio, no database."""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import SandboxBusy
from corral.sandbox._locks import AsyncOwnerLock


@pytest.mark.asyncio
async def test_waiters_get_the_lock_in_turn_after_an_uncontended_holder() -> None:
    lock = AsyncOwnerLock()
    await lock.acquire(None)
    await lock.acquire(None)  # reentrant for its task
    order: list[int] = []

    async def waiter(i: int) -> None:
        await lock.acquire(5.0)
        order.append(i)
        await asyncio.sleep(0)
        lock.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert order == []  # all three wait for the holder
    lock.release()
    await asyncio.sleep(0.01)
    assert order == []  # still held once
    lock.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert lock.holder is None
    await lock.acquire(None)  # free again, and uncontended
    assert lock.holder is asyncio.current_task()


@pytest.mark.asyncio
async def test_a_wait_past_the_timeout_names_the_holder_and_force_release_frees_it() -> None:
    lock = AsyncOwnerLock()
    await lock.acquire(None)
    holder = asyncio.current_task()
    assert holder is not None

    async def impatient() -> None:
        await lock.acquire(0.05)

    with pytest.raises(SandboxBusy, match=repr(holder.get_name())):
        await asyncio.create_task(impatient())
    got = asyncio.create_task(impatient())
    await asyncio.sleep(0)
    lock.force_release()
    await got  # the queued waiter gets it once the holder is forced out
    assert lock.holder is got
