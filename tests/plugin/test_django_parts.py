"""The pieces of Django support that need no Django project: names, DSNs, settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral._plugin._django import DjangoInfo
from corral._plugin._django_setup import admin_dsn_of, is_postgres, overrides_for, point_at

pytest.importorskip("psycopg")


def _info(run_id: str = "ab12cd34", tag: str = "") -> DjangoInfo:
    return DjangoInfo(run_id=run_id, controller_pid=1, clone_tag=tag, groups=[])


def test_clone_names_are_per_group_and_process_and_fit_postgres() -> None:
    info = _info()
    assert info.clone_name(0, "gw1") == "corral_ab12cd34_dj0_gw1"
    assert info.clone_name(1, "main") == "corral_ab12cd34_dj1_main"
    assert _info(tag="f00d").clone_name(0, "gw0") == "corral_ab12cd34_dj0_f00d_gw0"
    long = _info(run_id="x" * 64)
    assert len(long.clone_name(0, "gw12")) <= 63
    assert long.clone_name(0, "gw12") != long.clone_name(1, "gw12")


def test_info_round_trips_through_json() -> None:
    info = DjangoInfo(
        run_id="r",
        controller_pid=7,
        clone_tag="",
        groups=[{"aliases": ["default"], "template": "corral_tpl_x", "admin_dsn": "d"}],
        mirrors={"replica": "default"},
        others=["cache"],
    )
    assert DjangoInfo.from_json(info.to_json()) == info


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("django.db.backends.postgresql", True),
        ("django.contrib.gis.db.backends.postgis", True),
        ("myproject.backends.postgresql", True),
        ("django.db.backends.sqlite3", False),
        ("django.db.backends.mysql", False),
    ],
)
def test_postgres_backends(engine: str, expected: bool) -> None:
    assert is_postgres({"ENGINE": engine}) is expected


def test_admin_dsn_of_a_django_database() -> None:
    from psycopg.conninfo import conninfo_to_dict

    dsn = admin_dsn_of(
        {
            "HOST": "db.local",
            "PORT": 6543,
            "USER": "app",
            "PASSWORD": "s e/cret",
            "NAME": "app",
            "OPTIONS": {"sslmode": "require", "isolation_level": 2},
        }
    )
    assert conninfo_to_dict(dsn) == {
        "dbname": "postgres",
        "host": "db.local",
        "port": "6543",
        "user": "app",
        "password": "s e/cret",
        "sslmode": "require",
    }


def test_overrides_point_a_database_at_another_server() -> None:
    overrides = overrides_for("postgresql://postgres@/postgres?host=/run/pg&port=5433")
    assert overrides == {"HOST": "/run/pg", "PORT": "5433", "USER": "postgres", "PASSWORD": ""}
    settings = {"NAME": "app", "HOST": "db", "OPTIONS": {"service": "prod", "sslmode": "allow"}}
    point_at(settings, "corral_x", overrides)
    assert settings["NAME"] == "corral_x"
    assert settings["HOST"] == "/run/pg"
    assert settings["OPTIONS"] == {"sslmode": "allow"}
    untouched = {"NAME": "app", "HOST": "db"}
    point_at(untouched, "corral_y", {})
    assert untouched == {"NAME": "corral_y", "HOST": "db"}


def test_migration_modules_of_any_shape_feed_the_hash() -> None:
    from corral._plugin._django_setup import _describe_modules

    class DisableMigrations:
        def __contains__(self, item: str) -> bool:
            return True

        def __getitem__(self, item: str) -> None:
            return None

    assert _describe_modules({"b": None, "a": "x.m"}) == "[('a', 'x.m'), ('b', None)]"
    assert _describe_modules(DisableMigrations()).endswith(".DisableMigrations")


def test_the_dump_cache_keeps_the_newest_dumps_per_project_and_drops_unused_ones(
    tmp_path: Path,
) -> None:
    from corral._plugin._django_cache import DUMP_MAX_AGE, DUMPS_KEPT, prune_dumps

    now = 1_000_000_000.0

    def dump(name: str, age: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
        return path

    # Project a's test database: five builds (its migrations changed), the newest kept.
    a = [dump(f"aaaa-corral_tpl_{i}-pg16.dump", age=i * 60.0) for i in range(5)]
    a15 = dump("aaaa-corral_tpl_0-pg15.dump", age=0)  # another server version: its own
    b_old = dump("bbbb-corral_tpl_9-pg16.dump", age=DUMP_MAX_AGE + 1)
    b_new = dump("bbbb-corral_tpl_8-pg16.dump", age=DUMP_MAX_AGE - 60)
    dead = dump("aaaa-corral_tpl_7-pg16.dump.tmp-999999999", age=0)  # pid long gone
    alive = dump(f"aaaa-corral_tpl_6-pg16.dump.tmp-{os.getpid()}", age=0)  # being written
    other = dump("notes.txt", age=DUMP_MAX_AGE * 2)
    removed = set(prune_dumps(tmp_path, now=now))
    assert removed == {*a[DUMPS_KEPT:], b_old, dead}
    assert all(p.exists() for p in (*a[:DUMPS_KEPT], a15, b_new, alive, other))
    assert prune_dumps(tmp_path / "missing", now=now) == []
