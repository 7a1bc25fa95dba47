from __future__ import annotations

import pytest
from app.models import User
from fastapi.testclient import TestClient
from sqlalchemy import func, text
from sqlmodel import Session, select


def count_users(db: Session) -> int:
    return db.exec(select(func.count()).select_from(User)).one()


def test_a_user_made_through_the_api_is_in_the_session(client: TestClient, db: Session) -> None:
    response = client.post("/users", json={"email": "ada@example.com", "full_name": "Ada"})
    assert response.status_code == 201, response.text
    user = db.get(User, response.json()["id"])
    assert user is not None
    assert user.email == "ada@example.com"


def test_a_user_committed_in_the_session_is_served(client: TestClient, db: Session) -> None:
    user = User(email="grace@example.com", full_name="Grace")
    db.add(user)
    db.commit()
    db.refresh(user)
    response = client.get(f"/users/{user.id}")
    assert response.status_code == 200, response.text
    assert response.json()["email"] == "grace@example.com"


@pytest.mark.parametrize("n", range(4))
def test_every_test_starts_with_no_user(client: TestClient, db: Session, n: int) -> None:
    assert count_users(db) == 0
    assert client.get("/users").json()["count"] == 0
    for i in range(n + 1):
        response = client.post("/users", json={"email": f"u{i}@example.com"})
        assert response.status_code == 201, response.text
    assert client.get("/users").json()["count"] == n + 1
    assert count_users(db) == n + 1


@pytest.mark.parametrize("n", range(3))
def test_the_same_email_in_every_test(client: TestClient, n: int) -> None:
    response = client.post("/users", json={"email": "same@example.com"})
    assert response.status_code == 201, response.text


def test_a_conflict_leaves_the_app_working(client: TestClient, db: Session) -> None:
    assert client.post("/users", json={"email": "dup@example.com"}).status_code == 201
    assert client.post("/users", json={"email": "dup@example.com"}).status_code == 409
    assert client.post("/users", json={"email": "other@example.com"}).status_code == 201
    assert count_users(db) == 2


def test_uses_session(db: Session) -> None:
    db.execute(text("INSERT INTO \"user\" (email) VALUES ('x@example.com')"))
    db.commit()
    assert count_users(db) == 1


def test_uses_session_again(db: Session) -> None:
    assert count_users(db) == 0
    db.add(User(email="x@example.com"))
    db.commit()
    assert count_users(db) == 1
