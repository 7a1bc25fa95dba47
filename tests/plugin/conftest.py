"""End-to-end plugin tests: inner pytest runs (pytester) of the sample suite in ``sample/``.

Inner runs share this session's PostgreSQL through ``CORRAL_DSN`` (fast); the tests of the
throwaway-server path use corral's warm initdb cache.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import psycopg
import pytest

from corral.postgres import database_dsn, default_cache_dir, drop_database
from tests._inner import RUN_VARIABLES
from tests.plugin._checks import SAMPLE

collect_ignore = ["sample"]

# pytester points HOME at its temporary directory: keep corral's real initdb cache.
_CACHE_DIR = str(default_cache_dir())


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory holding a copy of the sample suite, with a clean environment."""
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CORRAL_PG_CACHE_DIR", os.environ.get("CORRAL_PG_CACHE_DIR", _CACHE_DIR))
    for item in SAMPLE.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            shutil.copytree(item, pytester.path / item.name)
        else:
            shutil.copy(item, pytester.path / item.name)
    return pytester


@pytest.fixture
def shared_server(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Inner runs use this session's server (as a user's own server would be used)."""
    monkeypatch.setenv("CORRAL_DSN", postgres_dsn)
    return postgres_dsn


@pytest.fixture
def developer_database(shared_server: str) -> Iterator[str]:
    """A database standing for the developer's own, which a bad env.py migrates."""
    name = f"corral_devdb_{secrets.token_hex(4)}"
    with psycopg.connect(shared_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield database_dsn(shared_server, name)
    drop_database(shared_server, name)
