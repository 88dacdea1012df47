"""service.db.core's reads: what a client receives is what the public models write,
and on PostgreSQL the driver path (autocommit reads straight on asyncpg) gives the
rows Core gives, fails as Core fails, and stays out of transactions and of
connections someone watches through SQLAlchemy's cursor events. Its writes:
`insert_row` stores exactly the values given, inside the session's transaction,
failing with SQLAlchemy's own errors, on each backend."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from sqlalchemy import bindparam, event, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.testclient import TestClient

from service import crud
from service.config import Settings
from service.db import autocommit, core, create_engine, create_sessionmaker, dispose, init_db
from service.lifespan import start
from service.models import (
    ConversationPage,
    ConversationPublic,
    MessagePage,
    MessagePublic,
    User,
    UserCreate,
    UserPage,
    UserPublic,
    email_key,
    utc_now,
)
from service.pagination import Cursor, PageRequest
from tests.conftest import make_settings
from tests.factories import create_conversation, create_message, create_user, user_body
from tests.proxy import Mode, TcpProxy, in_front_of
from tests.support import execute


def test_reads_and_pages_are_the_bytes_the_public_models_write(client: TestClient) -> None:
    """Reads skip building the public model: its field order and formats must hold."""
    user = create_user(client)
    create_user(client)
    conversation = create_conversation(client, user["uid"])
    message = create_message(client, conversation["uid"])
    cases: list[tuple[str, type[BaseModel]]] = [
        (f"/users/{user['uid']}", UserPublic),
        (f"/conversations/{conversation['uid']}", ConversationPublic),
        (f"/messages/{message['uid']}", MessagePublic),
        ("/users?limit=1", UserPage),  # with a next_cursor
        ("/users", UserPage),
        (f"/users/{user['uid']}/conversations", ConversationPage),
        (f"/conversations/{conversation['uid']}/messages", MessagePage),
    ]
    for path, public in cases:
        response = client.get(path)
        assert response.status_code == 200, path
        expected = public.model_validate_json(response.content).model_dump_json().encode()
        assert response.content == expected, path
    assert client.get("/users?limit=1").json()["next_cursor"] is not None


@asynccontextmanager
async def _engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(make_settings(postgres_url, db_statement_timeout_ms=300))
    try:
        await init_db(engine)
        yield engine
    finally:
        await engine.dispose()


def _queries_logged(connection: Any) -> tuple[list[str], Callable[[], None]]:
    """Statements asyncpg itself runs on `connection` (the driver path; not Core's
    prepared statements, nor the adapter's BEGIN/COMMIT), and a function that stops
    recording."""
    driver = connection.sync_connection.connection.driver_connection
    seen: list[str] = []

    def record(query: Any) -> None:
        if not query.query.startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            seen.append(query.query)

    driver.add_query_logger(record)
    return seen, lambda: driver.remove_query_logger(record)


def _user(number: int) -> UserCreate:
    return UserCreate(
        username=f"user{number}",
        email=f"user{number}@example.com",
        first_name="Ada",
        last_name="Lovelace",
    )


async def _reads(session: AsyncSession, uids: list[uuid.UUID]) -> list[Any]:
    """Every kind of read the routes make, in autocommit as a GET's session is."""
    first = await crud.list_users(session, page=PageRequest(limit=2, after=None))
    after = Cursor(at=first[1]["created_at"], uid=first[1]["uid"])
    return [
        first,
        await crud.list_users(session, page=PageRequest(limit=2, after=after)),
        await crud.read_row(session, model=User, uid=uids[0]),
        await crud.exists(session, model=User, uid=uids[1]),
        await crud.exists(session, model=User, uid=uuid.uuid4()),
    ]


@pytest.mark.postgres
def test_driver_reads_give_the_rows_core_gives(postgres_url: str) -> None:
    statements: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    async def scenario() -> tuple[list[Any], list[Any], list[str]]:
        async with _engine(postgres_url) as engine:
            sessions = create_sessionmaker(engine)
            async with sessions() as session:
                uids = [(await crud.create_user(session, data=_user(n)))["uid"] for n in range(5)]
                await session.commit()
            async with sessions(bind=autocommit(engine)) as session:
                seen, stop = _queries_logged(await session.connection())
                driver_reads = await _reads(session, uids)
                stop()
            event.listen(engine.sync_engine, "before_cursor_execute", watch)
            try:
                async with sessions(bind=autocommit(engine)) as session:
                    core_reads = await _reads(session, uids)
            finally:
                event.remove(engine.sync_engine, "before_cursor_execute", watch)
            return driver_reads, core_reads, seen

    driver_reads, core_reads, seen = asyncio.run(scenario())

    assert driver_reads == core_reads
    assert [list(row) for row in driver_reads[0]] == [list(row) for row in core_reads[0]]
    assert len(driver_reads[0]) == 3  # one row more than the page
    assert len(seen) == 5  # without a watcher, every read ran on the driver
    assert len(statements) == 5  # with one, every read went through Core


@pytest.mark.postgres
def test_a_read_inside_a_transaction_goes_through_it(postgres_url: str) -> None:
    """Even as the transaction's first statement (the adapter sends BEGIN lazily, on
    the first statement it runs): a read outside would see another snapshot, and
    behind PgBouncer in transaction mode possibly another server connection."""

    async def scenario() -> None:
        async with _engine(postgres_url) as engine:
            sessions = create_sessionmaker(engine)
            async with sessions() as session:
                existing = await crud.create_user(session, data=_user(1))
                await session.commit()
            async with sessions() as session:
                seen, stop = _queries_logged(await session.connection())
                first = await crud.read_row(session, model=User, uid=existing["uid"])
                created = await crud.create_user(session, data=_user(2))
                # Uncommitted: only a read inside this transaction can see it.
                second = await crud.read_row(session, model=User, uid=created["uid"])
                stop()
                await session.rollback()
            assert first is not None and second is not None
            assert seen == []

    asyncio.run(scenario())


_SLEEP = select(func.pg_sleep(bindparam("seconds")))


_PID = select(func.pg_backend_pid().label("pid"))


@pytest.mark.postgres
def test_driver_reads_fail_as_core_reads_do(postgres_url: str) -> None:
    """A statement timeout and a lost connection raise the DBAPIErrors the service
    maps to 503 (with their SQLSTATE), and the lost connection is invalidated."""

    async def scenario() -> None:
        async with _engine(postgres_url) as engine:
            reads = partial(create_sessionmaker(engine), bind=autocommit(engine))
            async with reads() as session:
                with pytest.raises(DBAPIError) as timed_out:
                    await core.fetch(session, _SLEEP, {"seconds": 2.0})
                assert getattr(timed_out.value.orig, "sqlstate", None) == "57014"
                assert not timed_out.value.connection_invalidated
                assert len(await core.fetch(session, _SLEEP, {"seconds": 0.0})) == 1

            async with reads() as session:
                pid = (await core.fetch(session, _PID, {}))[0]["pid"]
                await execute(postgres_url, f"SELECT pg_terminate_backend({pid})")
                with pytest.raises(DBAPIError) as lost:
                    await core.fetch(session, _SLEEP, {"seconds": 0.0})
                assert lost.value.connection_invalidated

            async with reads() as session:  # the pool recovered
                assert (await core.fetch(session, _PID, {}))[0]["pid"] != pid

    asyncio.run(scenario())


@pytest.mark.postgres
def test_a_client_side_timeout_stays_the_timeout_error_core_gives(postgres_url: str) -> None:
    """Behind PgBouncer the only timeout is asyncpg's own (command_timeout): it must
    reach the handlers as the bare TimeoutError Core lets through (a 503), on both
    paths."""

    def watch(*_: Any) -> None:
        """Listening for cursor events sends reads through Core."""

    async def scenario() -> None:
        settings = make_settings(postgres_url, db_statement_timeout_ms=300, db_pgbouncer=True)
        engine = create_engine(settings)
        reads = partial(create_sessionmaker(engine), bind=autocommit(engine))
        try:
            for watched in (False, True):
                if watched:
                    event.listen(engine.sync_engine, "before_cursor_execute", watch)
                async with reads() as session:
                    with pytest.raises(TimeoutError):
                        await core.fetch(session, _SLEEP, {"seconds": 2.0})
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", watch)
            await engine.dispose()

    asyncio.run(scenario())


# -- writes ----------------------------------------------------------------------


def test_a_created_user_is_the_bytes_the_public_model_writes(client: TestClient) -> None:
    """POST /users answers from the values it inserted, written as a read's row."""
    response = client.post("/users", json=user_body())
    assert response.status_code == 201
    expected = UserPublic.model_validate_json(response.content).model_dump_json().encode()
    assert response.content == expected
    assert response.headers["location"] == f"/users/{response.json()['uid']}"


USERS = User.__table__


def _user_row(email: str, *, verified: bool) -> dict[str, Any]:
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
    kept = _user_row("kept@example.com", verified=True)
    dropped = _user_row("dropped@example.com", verified=False)

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
                connection = await session.connection()
                rows = (await connection.execute(select(USERS))).mappings().all()
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
                    await core.insert_row(
                        session, USERS, _user_row("a@example.com", verified=False)
                    )
            async with sessions() as session:
                count = (await session.exec(text("SELECT count(*) FROM users"))).one()[0]
            return lost.value.connection_invalidated, count
        finally:
            await dispose(engine)

    assert asyncio.run(scenario()) == (True, 0)


@pytest.mark.postgres
def test_a_ping_returns_its_connection_and_drops_one_it_gave_up_on(postgres_url: str) -> None:
    """/health's question: the pooled connection goes back after an answer; one
    abandoned mid-question (the database went silent) is invalidated, so once the
    database answers again the next ping gets a fresh connection, not one still
    waiting for the old answer."""

    async def scenario(proxy: TcpProxy, proxied_url: str) -> None:
        engine = create_engine(make_settings(proxied_url, db_pool_size=1, db_max_overflow=0))
        try:
            await core.ping(engine)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            proxy.set_mode(Mode.SILENT)
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.5):
                    await core.ping(engine)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            proxy.set_mode(Mode.PASS)
            await core.ping(engine)
        finally:
            await engine.dispose()

    with in_front_of(postgres_url) as (proxy, proxied_url):
        asyncio.run(scenario(proxy, proxied_url))


def test_cursor_event_listeners_see_every_read_and_the_insert(client: TestClient) -> None:
    """Tracing and statement counters hook SQLAlchemy's cursor events: with one
    listening, the hot paths go through Core so it sees their statements."""
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement.split(None, 1)[0])

    engine = client.app_state["engine"].sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        user = create_user(client)
        inserted = list(statements)
        statements.clear()
        assert client.get(f"/users/{user['uid']}").status_code == 200
        assert client.get("/users").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert "INSERT" in inserted
    assert statements == ["SELECT", "SELECT"]
