"""/posts/{id}/comments, and the notifier replaced through FastAPI's dependency overrides."""

from __future__ import annotations

import pytest


@pytest.fixture
async def post(author, make_post):
    return await make_post(author, title="Open thread", published=True)


async def test_comment_notifies_the_author(client, post, author, make_user, notifier) -> None:
    reader = await make_user(name="Reader")
    response = await client.post(
        f"/posts/{post['id']}/comments", json={"author_id": reader["id"], "body": "Nice!"}
    )
    assert response.status_code == 201
    assert response.json()["body"] == "Nice!"
    assert notifier.sent == [(author["email"], "Reader commented on 'Open thread'")]


async def test_own_comment_notifies_nobody(client, post, author, notifier) -> None:
    body = {"author_id": author["id"], "body": "Addendum"}
    assert (await client.post(f"/posts/{post['id']}/comments", json=body)).status_code == 201
    assert notifier.sent == []


async def test_drafts_take_no_comments(client, author, make_post) -> None:
    draft = await make_post(author)
    body = {"author_id": author["id"], "body": "early"}
    response = await client.post(f"/posts/{draft['id']}/comments", json=body)
    assert response.status_code == 409


@pytest.mark.parametrize("missing", ["post", "user"])
async def test_comment_on_unknown(client, post, author, missing) -> None:
    post_id = 999999 if missing == "post" else post["id"]
    author_id = 999999 if missing == "user" else author["id"]
    response = await client.post(
        f"/posts/{post_id}/comments", json={"author_id": author_id, "body": "?"}
    )
    assert response.status_code == 404


@pytest.mark.parametrize("body", ["", "x" * 2001, None])
async def test_invalid_comments(client, post, author, body) -> None:
    response = await client.post(
        f"/posts/{post['id']}/comments", json={"author_id": author["id"], "body": body}
    )
    assert response.status_code == 422


async def test_comments_in_order_and_counted(client, post, make_user) -> None:
    readers = [await make_user(name=f"R{i}") for i in range(3)]
    for i, reader in enumerate(readers):
        body = {"author_id": reader["id"], "body": f"comment {i}"}
        await client.post(f"/posts/{post['id']}/comments", json=body)
    listed = (await client.get(f"/posts/{post['id']}/comments")).json()
    assert [c["body"] for c in listed] == ["comment 0", "comment 1", "comment 2"]
    assert (await client.get(f"/posts/{post['id']}")).json()["comment_count"] == 3


async def test_comments_of_unknown_post(client) -> None:
    assert (await client.get("/posts/999999/comments")).status_code == 404
