"""Use case 5: a job split into chunks processed in parallel, results collected through
the broker.

Each chunk test counts the primes in its slice of [0, 100000) and pushes its result
onto a queue, then counts itself done. The test that completes the last chunk (whichever
worker runs it) pops every result and stores the total: no test waits for another, so no
worker can deadlock waiting for a chunk queued behind it.
"""

from __future__ import annotations

import math

import pytest

CHUNKS = 10
SIZE = 10_000


def count_primes(start: int, stop: int) -> int:
    return sum(
        1 for n in range(max(start, 2), stop) if all(n % d for d in range(2, math.isqrt(n) + 1))
    )


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_process_chunk(corral, corral_worker_id: str, chunk: int) -> None:
    primes = count_primes(chunk * SIZE, (chunk + 1) * SIZE)
    corral.push("prime-chunks", {"chunk": chunk, "primes": primes, "by": corral_worker_id})
    if corral.incr("prime-chunks-done", ttl=3600) == CHUNKS:
        # The last one: every result was pushed before its chunk counted itself done.
        results = [corral.pop("prime-chunks", timeout=5) for _ in range(CHUNKS)]
        assert sorted(r["chunk"] for r in results) == list(range(CHUNKS))
        total = sum(r["primes"] for r in results)
        corral.set("primes-total", total, ttl=3600)
        assert total == 9592  # pi(100000)
