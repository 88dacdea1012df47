"""Peer 1: the seed's design, which this service grew out of and a user might still pick.

FastAPI; the engine made at import as `AsyncEngine(create_engine(...))`; `init_db`
runs `SQLModel.metadata.create_all` in `async_engine.begin()`; a `get_session()`
dependency that builds a `sessionmaker` on every call and yields a session from it;
handlers take the session through `Depends` and use `session.get`, `session.add` +
`commit` + `refresh` and `session.exec(select(...))`. Only the pool bounds are set,
to the service's, so every target has the same pool of 10.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db \\
        bench/.venv-peers/bin/uvicorn --app-dir bench peer_seed:app
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from peer_common import (
    ASYNC_DATABASE_URL,
    DEFAULT_LIMIT,
    HEALTH_MEDIA_TYPE,
    HEALTH_TIMEOUT_SECONDS,
    LIVE_BODY,
    MAX_LIMIT,
    MAX_OVERFLOW,
    NO_STORE,
    POOL_SIZE,
    UserBase,
    UserCreate,
    UserPage,
    UserPublic,
    decode_cursor,
    readiness,
    split_page,
    utc_now,
)
from sqlalchemy import Column, DateTime, Index, func, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, SQLModel, create_engine, select
from sqlmodel.ext.asyncio.session import AsyncSession


class User(UserBase, table=True):
    __tablename__ = "users"

    uid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    verified_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True)
    )
    created_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utc_now, sa_column=Column(DateTime(timezone=True), nullable=False)
    )


# The service's indexes, so create_all alone would build the same table.
Index("uq_users_email_lower", func.lower(User.email), unique=True)
Index("ix_users_created_at_uid", User.created_at, User.uid)

async_engine = AsyncEngine(
    create_engine(url=ASYNC_DATABASE_URL, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
)


async def init_db() -> None:
    async with async_engine.begin() as connection:
        await connection.run_sync(SQLModel.metadata.create_all)


async def get_session() -> AsyncIterator[AsyncSession]:
    Session = sessionmaker(bind=async_engine, class_=AsyncSession, expire_on_commit=False)
    async with Session() as session:
        yield session


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await init_db()
    try:
        yield
    finally:
        await async_engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/users/{uid}", response_model=UserPublic)
async def read_user(uid: uuid.UUID, session: AsyncSession = Depends(get_session)) -> User:  # noqa: B008
    user = await session.get(User, uid)
    if user is None:
        raise HTTPException(status_code=404, detail="user not found")
    return user


@app.post("/users", response_model=UserPublic, status_code=201)
async def create_user(data: UserCreate, session: AsyncSession = Depends(get_session)) -> User:  # noqa: B008
    user = User.model_validate(data)
    if user.is_verified:
        user.verified_at = user.created_at
    session.add(user)
    try:
        await session.commit()
    except IntegrityError as exc:
        detail = "a user with this email already exists"
        raise HTTPException(status_code=409, detail=detail) from exc
    await session.refresh(user)
    return user


@app.get("/users", response_model=UserPage)
async def list_users(
    limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT),
    cursor: str | None = None,
    session: AsyncSession = Depends(get_session),  # noqa: B008
) -> dict[str, Any]:
    statement = select(User).order_by(User.created_at, User.uid).limit(limit + 1)
    if cursor:
        after = decode_cursor(cursor)
        if after is None:
            raise HTTPException(status_code=422, detail="not a cursor this service issued")
        statement = statement.where(tuple_(User.created_at, User.uid) > after)
    users = (await session.exec(statement)).all()
    items, next_cursor = split_page(users, limit)
    return {"items": items, "next_cursor": next_cursor}


@app.get("/health")
async def read_health(session: AsyncSession = Depends(get_session)) -> Response:  # noqa: B008
    started = time.perf_counter()
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            await session.execute(text("SELECT 1"))
        ok = True
    except Exception:
        ok = False
    return JSONResponse(
        readiness(ok, started, async_engine.pool),
        status_code=200 if ok else 503,
        media_type=HEALTH_MEDIA_TYPE,
        headers=NO_STORE,
    )


@app.get("/health/live")
async def read_liveness() -> Response:
    return Response(LIVE_BODY, media_type=HEALTH_MEDIA_TYPE, headers=NO_STORE)
