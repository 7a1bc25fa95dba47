"""/tags, and the tag table's unique names under parallel tests."""

from __future__ import annotations

import asyncio

import pytest


async def test_tags_by_popularity(client, author, make_post) -> None:
    await make_post(author, tags=["python", "sql"])
    await make_post(author, tags=["python"])
    await make_post(author, tags=["go", "sql", "python"])
    assert (await client.get("/tags")).json() == [
        {"name": "python", "posts": 3},
        {"name": "sql", "posts": 2},
        {"name": "go", "posts": 1},
    ]


async def test_no_tags(client) -> None:
    assert (await client.get("/tags")).json() == []


@pytest.mark.parametrize("attempt", range(8))
async def test_the_same_new_tag_in_every_test(client, author, make_post, attempt: int) -> None:
    # tag.name is unique: every test creates the "fresh" tag and none waits for or
    # collides with another test's uncommitted row.
    post = await make_post(author, tags=["fresh", f"n{attempt}"])
    assert post["tags"] == sorted(["fresh", f"n{attempt}"])
    assert {t["name"] for t in (await client.get("/tags")).json()} == {"fresh", f"n{attempt}"}


async def test_concurrent_requests_in_one_test(client, author) -> None:
    # asyncio.gather of ten requests: they share the test's sandbox and take turns on
    # its connection, as requests on a one-connection pool would.
    bodies = [{"author_id": author["id"], "title": f"t{i}", "body": "b"} for i in range(10)]
    responses = await asyncio.gather(*(client.post("/posts", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [201] * 10
    assert len((await client.get("/posts", params={"limit": 100})).json()) == 10
