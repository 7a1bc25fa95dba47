from __future__ import annotations

import os

import app  # type: ignore[import-not-found]
import psycopg
import pytest


@pytest.mark.no_sandbox
def test_commits_for_real() -> None:
    app.add_item("widget")
    url = os.environ["CORRAL_DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM item").fetchone() == (2,)
        other.execute("VACUUM item")
        other.execute("LISTEN ping")
        # From another session: psycopg < 3.2.4 does not yield, from notifies(), a
        # notification that arrived with one of the connection's own statements.
        with psycopg.connect(url, autocommit=True) as sender:
            sender.execute("NOTIFY ping, 'hello'")
        assert [n.payload for n in other.notifies(timeout=1, stop_after=1)] == ["hello"]


@pytest.mark.no_sandbox
def test_starts_from_a_fresh_database() -> None:
    assert app.names() == ["seed"]
    app.add_item("widget")


def test_after_no_sandbox_nothing_leaked() -> None:
    app.add_item("widget")
    assert app.names() == ["seed", "widget"]
