"""The application's one database handle: a psycopg pool, sandboxed when a test run asks.

This is the whole corral adoption in the application code: the pool is wrapped with
``sandbox(...)``. In production ``mode`` is ``"normal"`` and the wrapper hands out the
pool's own connections; the test suite's conftest sets ``INVENTORY_DB_MODE=sandbox``.
"""

from __future__ import annotations

import os

from psycopg_pool import ConnectionPool

from corral.sandbox import sandbox

#: The app reads its URL at import, as many apps do; corral's pytest plugin exports each
#: test process's own database under this name before any conftest.py is imported.
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql:///inventory")

#: "sandbox" under test (every test in one rolled-back transaction), "normal" otherwise.
DB_MODE = os.environ.get("INVENTORY_DB_MODE", "normal")

pool = sandbox(
    ConnectionPool(DATABASE_URL, min_size=1, max_size=8, open=True, name="inventory"),
    mode=DB_MODE,
)
