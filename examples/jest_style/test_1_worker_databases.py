"""Use case 1: every worker gets its own database from a pool, for the whole run.

The pool holds five SQLite database files. A worker acquires one in a session fixture
and keeps it until it exits; the broker gives each item to one holder at a time and
frees it when the holder's process ends, even by a crash.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

import pytest

DATABASES = [f"tenant_{i}.sqlite3" for i in range(5)]


@pytest.fixture(scope="session")
def tenant_db(corral, corral_worker_id: str) -> Iterator[sqlite3.Connection]:
    corral.pool("tenant-dbs", DATABASES)  # idempotent: every worker declares the same pool
    with corral.acquire("tenant-dbs", timeout=60) as name:
        path = os.path.join(os.environ["JEST_STYLE_DATA"], name)
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE IF NOT EXISTS writes (worker TEXT, n INTEGER)")
        try:
            yield conn
        finally:
            conn.close()


@pytest.mark.parametrize("n", range(6))
def test_only_this_worker_writes_to_its_database(tenant_db, corral_worker_id, n) -> None:
    with tenant_db:
        tenant_db.execute("INSERT INTO writes VALUES (?, ?)", [corral_worker_id, n])
    workers = {w for (w,) in tenant_db.execute("SELECT DISTINCT worker FROM writes")}
    assert workers == {corral_worker_id}
