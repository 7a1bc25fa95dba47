"""The HTTP API: routes for users, posts, comments and tags."""

from __future__ import annotations

import logging
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Response, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from blog.db import get_session
from blog.models import Comment, Post, Tag, User, post_tag
from blog.schemas import CommentIn, CommentOut, PostIn, PostOut, PostPatch, TagOut, UserIn, UserOut

logger = logging.getLogger("blog")

app = FastAPI(title="blog")

SessionDep = Annotated[AsyncSession, Depends(get_session)]


class Notifier(Protocol):
    async def notify(self, email: str, message: str) -> None: ...


class LogNotifier:
    """Production would send mail; this logs."""

    async def notify(self, email: str, message: str) -> None:
        logger.info("to %s: %s", email, message)


def get_notifier() -> Notifier:
    return LogNotifier()


NotifierDep = Annotated[Notifier, Depends(get_notifier)]


# ---------------------------------------------------------------------- users


@app.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def create_user(body: UserIn, session: SessionDep) -> User:
    user = User(email=body.email, name=body.name)
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, f"{body.email} is registered") from None
    return user


@app.get("/users", response_model=list[UserOut])
async def list_users(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[User]:
    rows = await session.scalars(select(User).order_by(User.id).limit(limit).offset(offset))
    return list(rows)


@app.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: int, session: SessionDep) -> User:
    return await _user(session, user_id)


@app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(user_id: int, session: SessionDep) -> Response:
    await session.delete(await _user(session, user_id))
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------------- posts


@app.post("/posts", status_code=status.HTTP_201_CREATED, response_model=PostOut)
async def create_post(body: PostIn, session: SessionDep) -> PostOut:
    await _user(session, body.author_id)
    post = Post(
        author_id=body.author_id, title=body.title, body=body.body, published=body.published
    )
    post.tags = await _tags(session, body.tags)
    session.add(post)
    await session.commit()
    return await _post_out(session, post.id)


@app.get("/posts", response_model=list[PostOut])
async def list_posts(
    session: SessionDep,
    tag: str | None = None,
    author_id: int | None = None,
    published: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[PostOut]:
    query = select(Post.id).order_by(Post.id.desc()).limit(limit)
    if tag is not None:
        query = query.join(post_tag).join(Tag).where(Tag.name == tag.lower())
    if author_id is not None:
        query = query.where(Post.author_id == author_id)
    if published is not None:
        query = query.where(Post.published == published)
    return [await _post_out(session, post_id) for post_id in await session.scalars(query)]


@app.get("/posts/{post_id}", response_model=PostOut)
async def get_post(post_id: int, session: SessionDep) -> PostOut:
    return await _post_out(session, post_id)


@app.patch("/posts/{post_id}", response_model=PostOut)
async def update_post(post_id: int, body: PostPatch, session: SessionDep) -> PostOut:
    post = await _post(session, post_id)
    changes = body.model_dump(exclude_unset=True, exclude={"tags"})
    for field, value in changes.items():
        if value is None:
            raise HTTPException(422, f"{field} cannot be null")
        setattr(post, field, value)
    if body.tags is not None:
        post.tags = await _tags(session, body.tags)
    await session.commit()
    return await _post_out(session, post_id)


@app.delete("/posts/{post_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_post(post_id: int, session: SessionDep) -> Response:
    await session.delete(await _post(session, post_id))
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------------- comments


@app.post(
    "/posts/{post_id}/comments", status_code=status.HTTP_201_CREATED, response_model=CommentOut
)
async def add_comment(
    post_id: int, body: CommentIn, session: SessionDep, notifier: NotifierDep
) -> Comment:
    post = await _post(session, post_id)
    author = await _user(session, body.author_id)
    if not post.published:
        raise HTTPException(status.HTTP_409_CONFLICT, "comments are open on published posts only")
    comment = Comment(post_id=post_id, author_id=author.id, body=body.body)
    session.add(comment)
    await session.commit()
    if post.author_id != author.id:
        owner = await _user(session, post.author_id)
        await notifier.notify(owner.email, f"{author.name} commented on {post.title!r}")
    return comment


@app.get("/posts/{post_id}/comments", response_model=list[CommentOut])
async def list_comments(post_id: int, session: SessionDep) -> list[Comment]:
    await _post(session, post_id)
    rows = await session.scalars(
        select(Comment).where(Comment.post_id == post_id).order_by(Comment.id)
    )
    return list(rows)


# ---------------------------------------------------------------------- tags


@app.get("/tags", response_model=list[TagOut])
async def list_tags(session: SessionDep) -> list[TagOut]:
    count = func.count(post_tag.c.post_id)
    rows = await session.execute(
        select(Tag.name, count).join(post_tag).group_by(Tag.name).order_by(count.desc(), Tag.name)
    )
    return [TagOut(name=name, posts=posts) for name, posts in rows]


# ---------------------------------------------------------------------- helpers


async def _user(session: AsyncSession, user_id: int) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {user_id}")
    return user


async def _post(session: AsyncSession, post_id: int) -> Post:
    post = await session.get(Post, post_id, options=[selectinload(Post.tags)])
    if post is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no post {post_id}")
    return post


async def _tags(session: AsyncSession, names: list[str]) -> list[Tag]:
    """The tags named *names*, created when missing."""
    if not names:
        return []
    existing = {t.name: t for t in await session.scalars(select(Tag).where(Tag.name.in_(names)))}
    for name in names:
        if name not in existing:
            existing[name] = Tag(name=name)
            session.add(existing[name])
    return [existing[name] for name in names]


async def _post_out(session: AsyncSession, post_id: int) -> PostOut:
    post = await _post(session, post_id)
    comments = await session.scalar(
        select(func.count()).select_from(Comment).where(Comment.post_id == post_id)
    )
    return PostOut(
        id=post.id,
        author_id=post.author_id,
        title=post.title,
        body=post.body,
        published=post.published,
        tags=[tag.name for tag in post.tags],
        comment_count=comments or 0,
        created_at=post.created_at,
    )
