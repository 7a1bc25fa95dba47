"""The API's request and response bodies (pydantic)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

_EMAIL = r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"
_TAG = r"^[a-z0-9][a-z0-9-]{0,39}$"


class UserIn(BaseModel):
    email: str = Field(pattern=_EMAIL, max_length=254)
    name: str = Field(min_length=1, max_length=100)

    @field_validator("email")
    @classmethod
    def lower(cls, value: str) -> str:
        return value.lower()


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str


def _normalise_tags(tags: list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    return sorted({tag.strip().lower() for tag in tags})


class PostIn(BaseModel):
    author_id: int
    title: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1)
    published: bool = False
    tags: list[str] = Field(default_factory=list, max_length=10)

    @field_validator("tags")
    @classmethod
    def tags_valid(cls, tags: list[str]) -> list[str]:
        return _check_tags(_normalise_tags(tags) or [])


class PostPatch(BaseModel):
    title: str | None = Field(default=None, min_length=1, max_length=200)
    body: str | None = Field(default=None, min_length=1)
    published: bool | None = None
    tags: list[str] | None = Field(default=None, max_length=10)

    @field_validator("tags")
    @classmethod
    def tags_valid(cls, tags: list[str] | None) -> list[str] | None:
        normal = _normalise_tags(tags)
        return None if normal is None else _check_tags(normal)


def _check_tags(tags: list[str]) -> list[str]:
    import re

    for tag in tags:
        if not re.fullmatch(_TAG, tag):
            raise ValueError(f"invalid tag {tag!r}: lowercase letters, digits and dashes")
    return tags


class PostOut(BaseModel):
    id: int
    author_id: int
    title: str
    body: str
    published: bool
    tags: list[str]
    comment_count: int
    created_at: datetime


class CommentIn(BaseModel):
    author_id: int
    body: str = Field(min_length=1, max_length=2000)


class CommentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    post_id: int
    author_id: int
    body: str


class TagOut(BaseModel):
    name: str
    posts: int
