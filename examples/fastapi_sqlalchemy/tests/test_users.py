"""/users through the HTTP API."""

from __future__ import annotations

import pytest


async def test_create_user(client) -> None:
    response = await client.post("/users", json={"email": "Ada@Example.com", "name": "Ada"})
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "ada@example.com"
    assert body["name"] == "Ada"
    assert isinstance(body["id"], int)  # never assert literal ids: sequences are not rolled back


@pytest.mark.parametrize("attempt", range(10))
async def test_the_same_email_in_every_test(client, attempt: int) -> None:
    # Ten tests, spread over the workers, register the same unique email: no test sees
    # another's row, so none gets a 409.
    response = await client.post("/users", json={"email": "same@example.com", "name": "Same"})
    assert response.status_code == 201, response.text
    assert len((await client.get("/users")).json()) == 1


async def test_duplicate_email_is_a_conflict_and_the_test_goes_on(client, make_user) -> None:
    await make_user(email="twice@example.com")
    response = await client.post("/users", json={"email": "TWICE@example.com", "name": "B"})
    assert response.status_code == 409
    # The app's failed transaction was a savepoint: the first user and the test survive.
    await make_user(email="thrice@example.com")
    assert [u["email"] for u in (await client.get("/users")).json()] == [
        "twice@example.com",
        "thrice@example.com",
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "No email"},
        {"email": "ada@example.com"},
        {"email": "not-an-email", "name": "A"},
        {"email": "a@b", "name": "A"},
        {"email": "a b@example.com", "name": "A"},
        {"email": "ada@example.com", "name": ""},
        {"email": "ada@example.com", "name": "x" * 101},
    ],
)
async def test_invalid_users_are_refused(client, body) -> None:
    response = await client.post("/users", json=body)
    assert response.status_code == 422
    assert (await client.get("/users")).json() == []


async def test_get_user(client, make_user) -> None:
    user = await make_user(name="Grace")
    response = await client.get(f"/users/{user['id']}")
    assert response.status_code == 200
    assert response.json() == user


async def test_unknown_user(client) -> None:
    response = await client.get("/users/999999")
    assert response.status_code == 404
    assert response.json() == {"detail": "no user 999999"}


@pytest.mark.parametrize(
    ("limit", "offset", "expected"), [(2, 0, 2), (2, 4, 1), (10, 0, 5), (5, 5, 0)]
)
async def test_list_users_pages(client, make_user, limit: int, offset: int, expected: int) -> None:
    users = [await make_user() for _ in range(5)]
    page = (await client.get("/users", params={"limit": limit, "offset": offset})).json()
    assert page == users[offset : offset + expected]


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"offset": -1}])
async def test_list_users_refuses_bad_pages(client, params) -> None:
    assert (await client.get("/users", params=params)).status_code == 422


async def test_delete_user_removes_their_posts(client, make_user, make_post) -> None:
    user = await make_user()
    post = await make_post(user)
    assert (await client.delete(f"/users/{user['id']}")).status_code == 204
    assert (await client.get(f"/users/{user['id']}")).status_code == 404
    assert (await client.get(f"/posts/{post['id']}")).status_code == 404


async def test_delete_unknown_user(client) -> None:
    assert (await client.delete("/users/999999")).status_code == 404
