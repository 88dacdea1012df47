"""service.db.core's write side, on each backend: `insert_row` stores exactly the
values given, inside the session's transaction, with SQLAlchemy's own errors."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from service.config import Settings
from service.db import core
from service.db.engine import create_sessionmaker, dispose
from service.lifespan import start
from service.models import User, email_key, utc_now
from tests.conftest import make_settings

USERS = User.__table__


def _user(email: str, *, verified: bool) -> dict[str, Any]:
    now = utc_now()
    return {
        "uid": uuid.uuid4(),
        "username": "ada",
        "email": email,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "role": "admin",
        "is_verified": verified,
        "verified_at": now if verified else None,
        "created_at": now,
        "updated_at": now,
        "email_key": email_key(email),
    }


def test_insert_row_commits_and_rolls_back_with_the_session(settings: Settings) -> None:
    kept = _user("kept@example.com", verified=True)
    dropped = _user("dropped@example.com", verified=False)

    async def scenario() -> tuple[list[dict[str, Any]], type[BaseException]]:
        engine = await start(settings)
        sessions = create_sessionmaker(engine)
        try:
            async with sessions() as session:
                await core.insert_row(session, USERS, kept)
                await session.commit()
            async with sessions() as session:
                await core.insert_row(session, USERS, dropped)
                await session.rollback()
            async with sessions() as session:
                with pytest.raises(IntegrityError) as taken:  # the unique email key
                    await core.insert_row(
                        session, USERS, {**dropped, "email_key": kept["email_key"]}
                    )
            async with sessions() as session:
                rows = (await core.execute(session, select(USERS), {})).mappings().all()
            return [dict(row) for row in rows], taken.type
        finally:
            await dispose(engine)

    rows, error = asyncio.run(scenario())
    assert rows == [kept]  # every value reads back as given: uuid, bool, UTC timestamps
    assert error is IntegrityError


@pytest.mark.postgres
def test_insert_row_on_a_lost_connection_says_it_was_invalidated(postgres_url: str) -> None:
    """As for any statement, so the service answers 503 and the pool replaces it."""

    async def scenario() -> tuple[bool, int]:
        engine = await start(make_settings(postgres_url))
        sessions = create_sessionmaker(engine)
        try:
            async with sessions() as session:
                pid = (await session.exec(text("SELECT pg_backend_pid()"))).one()[0]
                async with engine.connect() as other:
                    await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                with pytest.raises(DBAPIError) as lost:
                    await core.insert_row(session, USERS, _user("a@example.com", verified=False))
            async with sessions() as session:
                count = (await session.exec(text("SELECT count(*) FROM users"))).one()[0]
            return lost.value.connection_invalidated, count
        finally:
            await dispose(engine)

    assert asyncio.run(scenario()) == (True, 0)
