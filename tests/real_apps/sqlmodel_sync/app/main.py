"""The HTTP API: users and their items."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from app.core.db import get_db
from app.models import Item, ItemCreate, User, UserCreate

app = FastAPI()
SessionDep = Annotated[Session, Depends(get_db)]


@app.post("/users", status_code=201)
def create_user(body: UserCreate, db: SessionDep) -> User:
    user = User.model_validate(body)
    db.add(user)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise HTTPException(409, "email taken") from None
    db.refresh(user)
    return user


@app.get("/users/{user_id}")
def read_user(user_id: int, db: SessionDep) -> User:
    user = db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "no such user")
    return user


@app.get("/users")
def list_users(db: SessionDep) -> dict[str, object]:
    users = db.exec(select(User).order_by(User.id)).all()
    count = db.exec(select(func.count()).select_from(User)).one()
    return {"data": [u.model_dump() for u in users], "count": count}


@app.post("/items", status_code=201)
def create_item(body: ItemCreate, db: SessionDep) -> Item:
    if db.get(User, body.owner_id) is None:
        raise HTTPException(404, "no such owner")
    item = Item.model_validate(body)
    db.add(item)
    db.commit()
    db.refresh(item)
    return item
