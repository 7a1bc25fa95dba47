"""Throwaway PostgreSQL servers and template databases for test runs.

:class:`EphemeralPostgres` starts a private, test-tuned server from the machine's PostgreSQL
binaries (or the ``pgserver`` wheel's); :func:`ensure_template` builds a schema's template
database once, :func:`clone_database` gives each worker its own copy.
"""

from __future__ import annotations

from corral.postgres._binaries import PostgresBinaries, find_all_binaries, find_binaries
from corral.postgres._cache import clear_cache, default_cache_dir
from corral.postgres._cluster import EphemeralPostgres
from corral.postgres._databases import (
    CorralDatabase,
    clone_database,
    drop_database,
    drop_stale_databases,
    list_databases,
)
from corral.postgres._osuser import ServerUser, resolve_server_user
from corral.postgres._runtime import cleanup_stale_clusters, default_runtime_dir
from corral.postgres._sql import database_dsn
from corral.postgres._templates import SchemaSource, ensure_template, schema_hash, template_name

__all__ = [
    "CorralDatabase",
    "EphemeralPostgres",
    "PostgresBinaries",
    "SchemaSource",
    "ServerUser",
    "cleanup_stale_clusters",
    "clear_cache",
    "clone_database",
    "database_dsn",
    "default_cache_dir",
    "default_runtime_dir",
    "drop_database",
    "drop_stale_databases",
    "ensure_template",
    "find_all_binaries",
    "find_binaries",
    "list_databases",
    "resolve_server_user",
    "schema_hash",
    "template_name",
]
