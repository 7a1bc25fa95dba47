"""The tables, as SQLModel classes."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class UserCreate(SQLModel):
    email: str
    full_name: str | None = None


class User(UserCreate, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True)


class ItemCreate(SQLModel):
    title: str
    owner_id: int


class Item(ItemCreate, table=True):
    id: int | None = Field(default=None, primary_key=True)
    owner_id: int = Field(foreign_key="user.id")
