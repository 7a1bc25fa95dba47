"""/posts through the HTTP API."""

from __future__ import annotations

import pytest


async def test_create_post_with_tags(client, author) -> None:
    response = await client.post(
        "/posts",
        json={
            "author_id": author["id"],
            "title": "Parallel tests",
            "body": "With corral.",
            "tags": ["Python", "testing", "python ", "postgres"],
        },
    )
    assert response.status_code == 201, response.text
    post = response.json()
    assert post["tags"] == ["postgres", "python", "testing"]  # normalised, deduplicated
    assert (post["published"], post["comment_count"]) == (False, 0)


async def test_post_by_unknown_author(client) -> None:
    response = await client.post("/posts", json={"author_id": 999999, "title": "T", "body": "B"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    "change",
    [
        {"title": ""},
        {"title": "x" * 201},
        {"body": ""},
        {"author_id": "me"},
        {"tags": "python"},
        {"tags": ["ok", "not ok"]},
        {"tags": ["-leading-dash"]},
        {"tags": ["x" * 41]},
        {"tags": [f"t{i}" for i in range(11)]},
        {"published": "maybe"},
    ],
)
async def test_invalid_posts_are_refused(client, author, change) -> None:
    body = {"author_id": author["id"], "title": "T", "body": "B", **change}
    assert (await client.post("/posts", json=body)).status_code == 422
    assert (await client.get("/posts")).json() == []


async def test_get_post(client, author, make_post) -> None:
    post = await make_post(author, tags=["a"])
    assert (await client.get(f"/posts/{post['id']}")).json() == post


async def test_unknown_post(client) -> None:
    assert (await client.get("/posts/999999")).status_code == 404


async def test_publish_and_retitle(client, author, make_post) -> None:
    post = await make_post(author)
    response = await client.patch(
        f"/posts/{post['id']}", json={"published": True, "title": "Better"}
    )
    assert response.status_code == 200
    assert (response.json()["published"], response.json()["title"]) == (True, "Better")


async def test_replace_tags(client, author, make_post) -> None:
    post = await make_post(author, tags=["old", "kept"])
    response = await client.patch(f"/posts/{post['id']}", json={"tags": ["kept", "new"]})
    assert response.json()["tags"] == ["kept", "new"]
    tags = {t["name"]: t["posts"] for t in (await client.get("/tags")).json()}
    assert tags == {"kept": 1, "new": 1}


@pytest.mark.parametrize("change", [{"title": None}, {"body": None}, {"published": None}])
async def test_patch_refuses_nulls(client, author, make_post, change) -> None:
    post = await make_post(author)
    assert (await client.patch(f"/posts/{post['id']}", json=change)).status_code == 422
    assert (await client.get(f"/posts/{post['id']}")).json() == post


async def test_patch_unknown_post(client) -> None:
    assert (await client.patch("/posts/999999", json={"title": "x"})).status_code == 404


async def test_delete_post_removes_its_comments(client, author, make_post) -> None:
    post = await make_post(author, published=True)
    comment = {"author_id": author["id"], "body": "first"}
    assert (await client.post(f"/posts/{post['id']}/comments", json=comment)).status_code == 201
    assert (await client.delete(f"/posts/{post['id']}")).status_code == 204
    assert (await client.get(f"/posts/{post['id']}")).status_code == 404
    assert (await client.get(f"/posts/{post['id']}/comments")).status_code == 404


async def test_list_posts_newest_first_with_limit(client, author, make_post) -> None:
    posts = [await make_post(author, title=f"post {i}") for i in range(4)]
    listed = (await client.get("/posts", params={"limit": 3})).json()
    assert [p["id"] for p in listed] == [p["id"] for p in reversed(posts)][:3]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"tag": "python"}, ["py-draft", "py-live"]),
        ({"tag": "PYTHON", "published": True}, ["py-live"]),
        ({"published": False}, ["go-draft", "py-draft"]),
        ({"tag": "rust"}, []),
    ],
)
async def test_filter_posts(client, author, make_post, params, expected) -> None:
    await make_post(author, title="py-live", tags=["python"], published=True)
    await make_post(author, title="py-draft", tags=["python", "drafts"])
    await make_post(author, title="go-draft", tags=["go"])
    titles = sorted(p["title"] for p in (await client.get("/posts", params=params)).json())
    assert titles == expected


async def test_filter_by_author(client, make_user, make_post) -> None:
    ada, bob = await make_user(name="Ada"), await make_user(name="Bob")
    await make_post(ada, title="by ada")
    await make_post(bob, title="by bob")
    listed = (await client.get("/posts", params={"author_id": bob["id"]})).json()
    assert [p["title"] for p in listed] == ["by bob"]
