"""A module whose fixture makes data for all its tests, rolled back when the module ends."""

from __future__ import annotations

import pytest
from app.models import Item, User
from fastapi.testclient import TestClient
from sqlalchemy import func
from sqlmodel import Session, select


@pytest.fixture(scope="module")
def owner(db: Session) -> User:
    user = User(email="owner@example.com", full_name="Owner")
    db.add(user)
    db.commit()
    db.refresh(user)
    return user


def test_the_module_fixture_is_visible_to_the_api(client: TestClient, owner: User) -> None:
    response = client.get(f"/users/{owner.id}")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("title", ["pen", "ink", "paper"])
def test_items_of_the_owner(client: TestClient, db: Session, owner: User, title: str) -> None:
    assert db.exec(select(func.count()).select_from(Item)).one() == 0
    response = client.post("/items", json={"title": title, "owner_id": owner.id})
    assert response.status_code == 201, response.text
    assert db.exec(select(func.count()).select_from(Item)).one() == 1
    assert db.exec(select(func.count()).select_from(User)).one() == 1


def test_an_unknown_owner(client: TestClient) -> None:
    assert client.post("/items", json={"title": "x", "owner_id": 999}).status_code == 404
