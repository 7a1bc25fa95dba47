"""The controller's end-of-run clean-up drops exactly its own clones, side by side."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import psycopg

from corral._plugin._run import Run, RunInfo
from corral._plugin._settings import Settings, empty_schema
from corral.postgres import clone_database, database_dsn, drop_database, ensure_template


def _names(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def test_drop_clones_drops_this_controllers_clones_only(postgres_dsn: str) -> None:
    template = ensure_template(postgres_dsn, empty_schema)
    run_id = f"rc{secrets.token_hex(3)}"
    info = RunInfo(
        run_id=run_id,
        controller_pid=os.getpid(),
        broker_path="",
        admin_dsn=postgres_dsn,
        template=template,
    )
    settings = Settings(
        dsn=postgres_dsn,
        schema=(),
        watch=(),
        database_env=(),
        database=True,
        sandbox=True,
        rootpath=Path.cwd(),
    )
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    mine = [
        clone_database(postgres_dsn, template, info.clone_name(slot), run_id=run_id)
        for slot in range(5)
    ]
    other_run = clone_database(postgres_dsn, template, run_id=f"{run_id}x")
    other_controller = clone_database(
        postgres_dsn, template, owner_pid=int(dead.stdout), run_id=run_id
    )
    # One of them still has a session, as the single process's app pool has at the end.
    held = psycopg.connect(database_dsn(postgres_dsn, mine[0]))
    try:
        dropped = Run(settings, info=info).drop_clones()
        assert sorted(dropped) == sorted(mine)
        names = _names(postgres_dsn)
        assert not names & set(mine)
        assert {other_run, other_controller} <= names  # not this controller's
    finally:
        held.close()
        drop_database(postgres_dsn, other_run)
        drop_database(postgres_dsn, other_controller)
