"""``--corral-shard K/N``: this invocation's share of the suite, chosen by each node id alone.

A test's shard is a hash of its node id, so every machine computes the same split whatever
order it collected in (pytest-randomly, xdist) and without talking to the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["shard_of", "split"]


class _Test(Protocol):
    @property
    def nodeid(self) -> str: ...


_Item = TypeVar("_Item", bound=_Test)


def shard_of(nodeid: str, count: int) -> int:
    """The shard (1..*count*) of the test *nodeid*: ``1 + int(sha256(nodeid)[:8 bytes]) % count``.

    Public in effect (users may reproduce it), so pinned by a test: changing it moves tests
    between shards of runs whose machines run different corral versions.
    """
    digest = hashlib.sha256(nodeid.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


def split(items: Sequence[_Item], shard: tuple[int, int]) -> tuple[list[_Item], list[_Item]]:
    """``(kept, dropped)``: the items of shard *shard* = ``(K, N)``, and the others, each
    in the order given."""
    index, count = shard
    kept: list[_Item] = []
    dropped: list[_Item] = []
    for item in items:
        (kept if shard_of(item.nodeid, count) == index else dropped).append(item)
    return kept, dropped
