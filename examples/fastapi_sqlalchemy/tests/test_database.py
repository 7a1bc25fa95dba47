"""The database behind the API: direct queries, the app's own rollbacks, no_sandbox tests."""

from __future__ import annotations

import os

import psycopg
import pytest
from blog.db import Session, engine
from blog.models import User
from sqlalchemy import func, select, text


async def _count_users() -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM app_user"))).scalar_one())


async def test_direct_queries_see_what_the_api_wrote(client, make_user) -> None:
    # The test's own engine connections join the same sandbox as the app's requests.
    await make_user()
    await make_user()
    assert await _count_users() == 2


async def test_the_apps_rollback_is_a_savepoint() -> None:
    async with Session() as session:
        session.add(User(email="rolled@example.com", name="Back"))
        await session.flush()
        await session.rollback()
        session.add(User(email="kept@example.com", name="Kept"))
        await session.commit()
    async with Session() as session:
        emails = await session.scalars(select(User.email))
        assert list(emails) == ["kept@example.com"]
        assert await session.scalar(select(func.count()).select_from(User)) == 1


@pytest.mark.no_sandbox
async def test_commits_for_real_without_a_sandbox(client) -> None:
    # This test commits; corral recreates this process's database after it.
    response = await client.post("/users", json={"email": "real@example.com", "name": "Real"})
    assert response.status_code == 201
    with psycopg.connect(os.environ["DATABASE_URL"]) as other:
        assert other.execute("SELECT email FROM app_user").fetchall() == [("real@example.com",)]


async def test_what_the_no_sandbox_test_committed_is_gone(client) -> None:
    assert (await client.get("/users")).json() == []
    assert await _count_users() == 0


@pytest.mark.parametrize(
    "name",
    ["Ada Lovelace", "Émilie du Châtelet", "李小龍", "O'Brien", "Robert'); DROP TABLE app_user;--"],
)
async def test_names_round_trip(client, name: str) -> None:
    response = await client.post("/users", json={"email": "n@example.com", "name": name})
    assert (await client.get(f"/users/{response.json()['id']}")).json()["name"] == name


@pytest.mark.parametrize(
    "email", ["x@example.com", "X@EXAMPLE.COM", "x@Example.Com", "X@example.com"]
)
async def test_emails_are_unique_regardless_of_case(client, make_user, email: str) -> None:
    await make_user(email="x@example.com")
    assert (await client.post("/users", json={"email": email, "name": "X"})).status_code == 409


@pytest.mark.parametrize("limit", ["0", "101", "many"])
async def test_list_posts_refuses_bad_limits(client, limit: str) -> None:
    assert (await client.get("/posts", params={"limit": limit})).status_code == 422


async def test_empty_patch_changes_nothing(client, author, make_post) -> None:
    post = await make_post(author, tags=["t"])
    response = await client.patch(f"/posts/{post['id']}", json={})
    assert response.json() == post


async def test_delete_twice(client, author, make_post) -> None:
    post = await make_post(author)
    assert (await client.delete(f"/posts/{post['id']}")).status_code == 204
    assert (await client.delete(f"/posts/{post['id']}")).status_code == 404


async def test_openapi_schema_lists_the_routes(client) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths) == {
        "/users",
        "/users/{user_id}",
        "/posts",
        "/posts/{post_id}",
        "/posts/{post_id}/comments",
        "/tags",
    }


@pytest.mark.parametrize("path", ["/users/abc", "/posts/abc"])
async def test_ids_must_be_integers(client, path: str) -> None:
    assert (await client.get(path)).status_code == 422
