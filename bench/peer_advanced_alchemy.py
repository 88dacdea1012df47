"""Peer 2: advanced-alchemy's Starlette extension, as its documentation sets it up.

`SQLAlchemyAsyncConfig` (pool bounds set to the service's, `expire_on_commit=False`,
`create_all=True`, `commit_mode="autocommit"`) handed to `AdvancedAlchemy(config=...,
app=app)`, which adds its session middleware and wraps the lifespan. Handlers take
the request's session with `alchemy.get_async_session(request)` and never commit:
the middleware commits after a 2xx response has been sent and rolls back otherwise.
A write flushes inside the handler, so a duplicate email is a 409 and not a lost row.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db \\
        bench/.venv-peers/bin/uvicorn --app-dir bench peer_advanced_alchemy:app
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime

from advanced_alchemy.base import DefaultBase
from advanced_alchemy.extensions.starlette import (
    AdvancedAlchemy,
    AsyncSessionConfig,
    EngineConfig,
    SQLAlchemyAsyncConfig,
)
from advanced_alchemy.types import DateTimeUTC
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
    UserCreate,
    UserPage,
    UserPublic,
    decode_cursor,
    readiness,
    split_page,
    utc_now,
)
from pydantic import ValidationError
from sqlalchemy import Index, String, func, select, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class User(DefaultBase):
    __tablename__ = "users"

    uid: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    username: Mapped[str] = mapped_column(String(64))
    email: Mapped[str] = mapped_column(String(254))
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16), default="user")
    is_verified: Mapped[bool] = mapped_column(default=False)
    verified_at: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utc_now)


# The service's indexes, so create_all alone would build the same table.
Index("uq_users_email_lower", func.lower(User.email), unique=True)
Index("ix_users_created_at_uid", User.created_at, User.uid)

alchemy_config = SQLAlchemyAsyncConfig(
    connection_string=ASYNC_DATABASE_URL,
    engine_config=EngineConfig(pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW),
    session_config=AsyncSessionConfig(expire_on_commit=False),
    commit_mode="autocommit",
    create_all=True,
)


def _json(model: UserPublic | UserPage, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _public(user: User) -> UserPublic:
    return UserPublic.model_validate(user, from_attributes=True)


async def read_user(request: Request) -> Response:
    session = alchemy.get_async_session(request)
    user = await session.get(User, request.path_params["uid"])
    if user is None:
        return JSONResponse({"detail": "user not found"}, status_code=404)
    return _json(_public(user))


async def create_user(request: Request) -> Response:
    try:
        data = UserCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        return JSONResponse({"detail": exc.errors(include_url=False)}, status_code=422)
    now = utc_now()
    user = User(
        **data.model_dump(),
        verified_at=now if data.is_verified else None,
        created_at=now,
        updated_at=now,
    )
    session = alchemy.get_async_session(request)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        return JSONResponse({"detail": "a user with this email already exists"}, status_code=409)
    return _json(_public(user), status=201)


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT:
        return int(raw)
    return None


async def list_users(request: Request) -> Response:
    limit = _limit(request.query_params.get("limit"))
    if limit is None:
        return JSONResponse({"detail": f"limit must be 1-{MAX_LIMIT}"}, status_code=422)
    statement = select(User).order_by(User.created_at, User.uid).limit(limit + 1)
    token = request.query_params.get("cursor")
    if token:
        after = decode_cursor(token)
        if after is None:
            return JSONResponse({"detail": "not a cursor this service issued"}, status_code=422)
        statement = statement.where(tuple_(User.created_at, User.uid) > after)
    session = alchemy.get_async_session(request)
    users = (await session.scalars(statement)).all()
    items, next_cursor = split_page(users, limit)
    return _json(UserPage(items=[_public(user) for user in items], next_cursor=next_cursor))


async def read_health(request: Request) -> Response:
    started = time.perf_counter()
    session = alchemy.get_async_session(request)
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            await session.execute(text("SELECT 1"))
        ok = True
    except Exception:
        ok = False
    return JSONResponse(
        readiness(ok, started, alchemy.get_async_engine().pool),
        status_code=200 if ok else 503,
        media_type=HEALTH_MEDIA_TYPE,
        headers=NO_STORE,
    )


async def read_liveness(request: Request) -> Response:
    return Response(LIVE_BODY, media_type=HEALTH_MEDIA_TYPE, headers=NO_STORE)


app = Starlette(
    routes=[
        Route("/health", read_health),
        Route("/health/live", read_liveness),
        Route("/users", list_users),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{uid:uuid}", read_user),
    ]
)
alchemy = AdvancedAlchemy(config=alchemy_config, app=app)
