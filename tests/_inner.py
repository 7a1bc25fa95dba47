"""The environment of a pytest run that a test starts: what it must not inherit from ours."""

from __future__ import annotations

# Run-scoped variables of corral and xdist: an inner run inheriting them would join (or
# be mistaken for a worker of) the outer run instead of starting its own.
RUN_VARIABLES = (
    "EPHEMERAL_PIPE",
    "EPHEMERAL_SECRET",
    "CORRAL_PLUGIN_RUN",
    "CORRAL_DJANGO",
    "CORRAL_RUN_ID",
    "CORRAL_BROKER_URL",
    "CORRAL_MACHINES",
    "CORRAL_HOST",
    "CORRAL_DATABASE_URL",
    "CORRAL_SANDBOX_MODE",
    "CORRAL_DSN",
    "CORRAL_COLOCATE",
    "CORRAL_GC_FREEZE",
    "CORRAL_SHARD",
    "DATABASE_URL",
    # libpq's, which each test process of a run sets to its own database
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
    "PYTEST_ADDOPTS",
    "PYTEST_CURRENT_TEST",
)
