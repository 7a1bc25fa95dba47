from __future__ import annotations

import os
import time

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
        heard: list[str] = []
        # A handler, not notifies(): psycopg 3.1 has no notifies(timeout=), and before
        # 3.2.4 notifies() does not yield a notification that arrived with one of the
        # connection's own statements; handlers get both.
        other.add_notify_handler(lambda n: heard.append(n.payload))
        other.execute("LISTEN ping")
        with psycopg.connect(url, autocommit=True) as sender:  # from another session
            sender.execute("NOTIFY ping, 'hello'")
        for _ in range(100):  # up to ~1 s for the notification to arrive
            if heard:
                break
            time.sleep(0.01)
            other.execute("SELECT 1")
        assert heard == ["hello"]


@pytest.mark.no_sandbox
def test_starts_from_a_fresh_database() -> None:
    assert app.names() == ["seed"]
    app.add_item("widget")


def test_after_no_sandbox_nothing_leaked() -> None:
    app.add_item("widget")
    assert app.names() == ["seed", "widget"]
