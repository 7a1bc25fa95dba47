"""corral's ``django_db_setup``: registered (over pytest-django's) only when Django support
is on. Each test process clones the run's templates instead of migrating.

A conftest that overrides ``django_db_setup`` and requests it (to load fixtures, say)
gets this one as its parent, as it would get pytest-django's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from corral._plugin._django_info import DjangoInfo
from corral._plugin._process import STATE, worker_name

__all__ = ["django_db_setup"]

log = logging.getLogger("corral.pytest")


def _used_aliases(items: Sequence[pytest.Item]) -> set[str] | None:
    """The aliases the collected tests use (None: all), as pytest-django computes them."""
    try:
        from pytest_django.fixtures import _get_databases_for_setup
    except ImportError:  # an older pytest-django sets up every database
        return None
    try:
        aliases, _serialized = _get_databases_for_setup(items)
    except Exception as exc:  # a private helper: never let it break the run
        log.debug("pytest-django's database list unavailable: %s", exc)
        return None
    return set(aliases)


class _Databases:
    """The clones of one test process, pointed at by Django's connections."""

    def __init__(self, info: DjangoInfo, verbosity: int, handover: Any = None) -> None:
        self.info = info
        self.verbosity = verbosity
        #: ``(broker client, worker)`` when the controller may have pre-created the clones.
        self.handover = handover
        self.clones: list[tuple[str, str]] = []  # (admin dsn, name)
        #: How many clones the controller had made for this process.
        self.precloned = 0
        self.others: Any = None

    def setup(self, used: set[str] | None, keepdb: bool) -> None:
        from django.db import connections
        from django.test.utils import setup_databases

        from corral._plugin._django_setup import SERIALIZED_SCHEMA, point_at
        from corral.postgres import clone_database, drop_database

        info = self.info
        others = [a for a in info.others if used is None or a in used]
        if others:
            # Other backends (SQLite beside PostgreSQL): Django makes them as it always does.
            self.others = setup_databases(
                self.verbosity, interactive=False, aliases=others, keepdb=keepdb
            )
        worker = worker_name()
        for index, entry in enumerate(info.groups):
            aliases: list[str] = entry["aliases"]
            needed = set(aliases) | {m for m, t in info.mirrors.items() if t in aliases}
            if used is not None and not needed & used:
                continue
            admin, template = entry["admin_dsn"], entry["template"]
            name = info.clone_name(index, worker)
            if self._take_precloned(name):
                self.precloned += 1
            else:
                drop_database(admin, name)  # a replaced worker's leftover
                clone_database(
                    admin, template, name, owner_pid=info.controller_pid, run_id=info.run_id
                )
            self.clones.append((admin, name))
            for alias in aliases:
                connections[alias].close()
                point_at(connections[alias].settings_dict, name, entry["overrides"])
            first = connections[aliases[0]]
            with first.cursor() as cursor:
                cursor.execute(f"SELECT alias, data FROM {SERIALIZED_SCHEMA}.serialized")
                rows = cursor.fetchall()
                cursor.execute(f"DROP SCHEMA {SERIALIZED_SCHEMA} CASCADE")
            for alias, data in rows:
                if data is not None and alias in connections:
                    # What Django's setup_databases() keeps for serialized_rollback.
                    connections[alias]._test_serialized_contents = data
            if self.verbosity > 0:
                log.info("corral: Django aliases %s on clone %s of %s", aliases, name, template)
        by_alias = {a: e for e in info.groups for a in e["aliases"]}
        for alias, target in info.mirrors.items():
            primary = connections[target].settings_dict
            connections[alias].close()
            overrides = by_alias[target]["overrides"] if target in by_alias else {}
            point_at(connections[alias].settings_dict, primary["NAME"], overrides)

    def _take_precloned(self, name: str) -> bool:
        if self.handover is None:
            return False
        from corral._plugin._database import take_precloned

        client, worker = self.handover
        return take_precloned(client, name, self.info.controller_pid, worker)

    def teardown(self, keepdb: bool) -> None:
        from django.db import connections
        from django.test.utils import teardown_databases

        for alias in connections:
            connections[alias].close()
        if self.others is not None and not keepdb:
            teardown_databases(self.others, verbosity=self.verbosity)
        # The clones are dropped by the controller at the end of the run, all at once.


def _handover(config: pytest.Config) -> tuple[Any, str] | None:
    """``(broker client, worker name)`` of an xdist worker whose controller may pre-create
    its clones (a local broker's run); None: this process makes its own."""
    process = config.stash.get(STATE, None)
    run = process.info if process is not None else None
    if process is None or run is None or run.broker_url or not hasattr(config, "workerinput"):
        return None
    client = process.broker_client()
    return None if client is None else (client, f"{process.identity}@{os.getpid()}")


@pytest.fixture(scope="session")
def django_db_setup(
    request: pytest.FixtureRequest,
    django_test_environment: None,
    django_db_blocker: Any,
    django_db_use_migrations: bool,
    django_db_keepdb: bool,
    django_db_createdb: bool,
    django_db_modify_db_settings: None,
) -> Iterator[None]:
    """Point Django's test databases at clones of the run's migrated templates."""
    info = getattr(request.config.pluginmanager.get_plugin("corral-django"), "info", None)
    assert isinstance(info, DjangoInfo)  # registered by _django.configure with its info
    keepdb = django_db_keepdb and not django_db_createdb
    if not django_db_use_migrations:
        from corral._plugin._django_setup import disable_migrations

        disable_migrations()  # as pytest-django does: the template was built so too
    databases = _Databases(info, int(request.config.option.verbose), _handover(request.config))
    with django_db_blocker.unblock():
        databases.setup(_used_aliases(request.session.items), keepdb)
    workeroutput = getattr(request.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["corral_django_precloned"] = databases.precloned
    yield
    with django_db_blocker.unblock():
        databases.teardown(keepdb)
