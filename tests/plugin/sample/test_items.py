from __future__ import annotations

import os

import app  # type: ignore[import-not-found]
import psycopg
import pytest


@pytest.mark.parametrize("n", range(12))
def test_insert_is_private(n: int) -> None:
    # The same unique name in every test: any leak between tests breaks this.
    app.add_item("widget")
    assert app.names() == ["seed", "widget"]


def test_app_transaction_commits_into_the_sandbox() -> None:
    app.add_item("a")
    app.rename("a", "b")
    assert app.names() == ["seed", "b"]


def test_nothing_committed_outside() -> None:
    app.add_item("widget")
    with psycopg.connect(os.environ["CORRAL_DATABASE_URL"]) as other:
        assert other.execute("SELECT count(*) FROM item").fetchone() == (1,)


def test_urls_agree(corral_database_url: str) -> None:
    assert os.environ["DATABASE_URL"] == corral_database_url == app.DATABASE_URL


def test_maybe_fails() -> None:
    assert not os.environ.get("SAMPLE_FAIL"), "failing on purpose"


def test_broker_fixture(corral, corral_worker_id: str) -> None:
    corral.set(f"seen:{corral_worker_id}", True, ttl=60)
    assert corral.get(f"seen:{corral_worker_id}") is True


def test_worker_dies_mid_test() -> None:
    app.add_item("widget")  # inside the sandbox, then the process vanishes
    if os.environ.get("SAMPLE_CRASH"):
        os._exit(3)
