"""Statements built once, run on a session's own connection, for the hot paths.

`session.execute` runs every statement through the ORM's execution layer (its
compile state, event hooks, result wrapping), which for a single-row INSERT or
SELECT costs more than the statement. Here a statement compiled once per shape
runs on the connection of the session's transaction (same commit or rollback).

Reads (`fetch`) in autocommit, every GET and HEAD session, go furthest on
PostgreSQL: asyncpg runs the compiled SQL straight on the connection and its
records become dicts, skipping SQLAlchemy's execution context, cursor adapter
and result objects. Autocommit is the condition because the adapter starts a
transaction lazily on its first statement: a read inside a write's transaction
must go through it. The INSERT of `insert_row` runs inside a transaction, so
on the adapter's DB-API cursor (which sends BEGIN). `/health`'s `ping` asks a
bare pooled connection, with no SQLAlchemy Connection around it.

Whichever path, errors take SQLAlchemy's own way (translated by the dialect,
raised as `DBAPIError`, a lost connection invalidated), so callers see the same
exceptions. Reads on SQLite, and every statement on a connection whose cursor
events someone listens to (tracing, statement counters: they must see each
one), go through Core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NoReturn

import anyio
from sqlalchemy import Dialect, Select, Table, insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.util import greenlet_spawn
from sqlmodel.ext.asyncio.session import AsyncSession

RowData = dict[str, Any]
# SQL text and the order of its parameter names, per statement, as compiled for asyncpg.
_COMPILED: dict[Select[Any], tuple[str, tuple[str, ...]]] = {}


async def fetch(
    session: AsyncSession, query: Select[Any], params: Mapping[str, Any]
) -> list[RowData]:
    """The rows of `query` (built once, with bound parameters) as dicts.

    Parameters must already be what the database stores (aware UTC datetimes,
    UUIDs): the driver path applies no bind processors."""
    # The sync connection, in one greenlet and without the AsyncConnection proxy
    # that `session.connection()` would build for every request.
    connection = await session.run_sync(Session.connection)
    return await _fetch(connection, query, params)


async def _fetch(
    connection: Connection, query: Select[Any], params: Mapping[str, Any]
) -> list[RowData]:
    adapted = _asyncpg_in_autocommit(connection)
    if adapted is None:
        return await greenlet_spawn(_core_rows, connection, query, params)
    sql, names = _COMPILED.get(query) or _compile(query, connection)
    arguments = [params[name] for name in names]
    try:
        records = await adapted.driver_connection.fetch(sql, *arguments)
    except Exception as error:
        await greenlet_spawn(_raise_as_sqlalchemy, connection, error, sql, arguments)
    return [dict(record) for record in records]


def _core_rows(
    connection: Connection, query: Select[Any], params: Mapping[str, Any]
) -> list[RowData]:
    return [dict(row) for row in connection.execute(query, params).mappings()]


async def ping(engine: AsyncEngine) -> None:
    """One round trip on a connection from `engine`'s pool: a health check's question.

    On asyncpg the connection is checked out of the pool bare (no Connection, no
    isolation level to set and reset around it) and asked `SELECT 1` outside any
    transaction; one that fails or is cancelled mid-question is invalidated, not
    trusted back into the pool. Elsewhere, the same through Core."""
    if engine.dialect.driver != "asyncpg":
        async with engine.connect() as connection:
            await connection.exec_driver_sql("SELECT 1")
        return
    pooled = await greenlet_spawn(engine.sync_engine.raw_connection)
    try:
        await pooled.driver_connection.fetchval("SELECT 1")  # type: ignore[union-attr]
    except BaseException:
        # Outside a greenlet the adapter terminates at once, where from inside one
        # it would say goodbye first, and wait on a database that no longer answers.
        pooled.invalidate()
        raise
    with anyio.CancelScope(shield=True):
        await greenlet_spawn(pooled.close)


def _asyncpg_in_autocommit(connection: Connection) -> Any | None:
    """The asyncpg adapter under `connection` if the driver path may run there: not
    inside a transaction, and nobody listening for SQLAlchemy's cursor events
    (tracing, statement counters), who must see every statement as before."""
    if connection.dialect.driver != "asyncpg" or connection.invalidated or _watched(connection):
        return None
    adapted = connection.connection.dbapi_connection
    return adapted if getattr(adapted, "autocommit", False) else None


def _watched(connection: Connection) -> bool:
    """Whether anyone listens for `connection`'s cursor events (tracing, statement
    counters): they must see every statement, so the hot paths go through Core."""
    return bool(connection.dispatch.before_cursor_execute)


def _compile(query: Select[Any], connection: Connection) -> tuple[str, tuple[str, ...]]:
    compiled = query.compile(dialect=connection.dialect)
    assert compiled.positiontup is not None  # asyncpg's paramstyle is positional ($1)
    _COMPILED[query] = entry = (compiled.string, tuple(compiled.positiontup))
    return entry


def _raise_as_sqlalchemy(
    connection: Connection, error: Exception, sql: str, arguments: list[Any]
) -> NoReturn:
    """What `Connection.execute` does with a driver error: the dialect translates it;
    a DB-API error SQLAlchemy wraps (hiding parameters as the engine does) and, if
    the connection was lost, invalidates it; anything else (asyncpg's own client
    timeout, a TimeoutError) goes on as it is. Runs in a greenlet: invalidation
    may await."""
    adapted = connection.connection.dbapi_connection
    try:
        adapted._handle_exception(error)  # type: ignore[union-attr]  # always raises
    except connection.dialect.loaded_dbapi.Error as translated:
        connection._handle_dbapi_exception(translated, sql, tuple(arguments), None, None)
    raise AssertionError("unreachable: the dialect re-raises every error")  # pragma: no cover


# -- writes --------------------------------------------------------------------
# Kept apart from the reads above. An INSERT whose row the caller already holds
# needs no result, so it runs in the dialect's own SQL on the DB-API cursor of the
# session's connection, skipping SQLAlchemy's compiled-cache lookup, execution
# context and result machinery. It is inside a transaction, so it goes through
# SQLAlchemy's DB-API adapter (not straight to asyncpg, as autocommit reads do):
# the adapter opens the transaction (BEGIN) on first use and translates driver
# errors; `_execute` then hands them to SQLAlchemy as `Connection.execute` would.


@dataclass(frozen=True)
class _DriverInsert:
    """`INSERT INTO <table> (<every column>) VALUES (...)` in a dialect's own SQL and
    positional parameter style, with the column types' bind conversions for it."""

    sql: str
    keys: tuple[str, ...]
    converters: tuple[Callable[[Any], Any] | None, ...]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            values[key] if convert is None else convert(values[key])
            for key, convert in zip(self.keys, self.converters, strict=True)
        )


@lru_cache(maxsize=16)  # a few tables, one dialect per engine
def _driver_insert(table: Table, dialect: Dialect) -> _DriverInsert:
    compiled = insert(table).compile(dialect=dialect)
    keys = tuple(compiled.positiontup or ())
    converters = tuple(
        table.c[key].type.dialect_impl(dialect).bind_processor(dialect) for key in keys
    )
    return _DriverInsert(compiled.string, keys, converters)


async def insert_row(session: AsyncSession, table: Table, values: Mapping[str, Any]) -> None:
    """Insert one row of `table`, `values` holding every column, in `session`'s
    transaction (on its connection, committed or rolled back with it)."""
    # One greenlet for taking the connection and the statement, and no AsyncConnection
    # proxy, which `session.connection()` builds and registers for every request.
    await session.run_sync(_insert, table, values)


def _insert(session: Session, table: Table, values: Mapping[str, Any]) -> None:
    connection = session.connection()
    if _watched(connection):  # Core, which tells the listeners
        connection.execute(insert(table), dict(values))
        return
    statement = _driver_insert(table, connection.dialect)
    _execute(connection, statement.sql, statement.parameters(values))


def _execute(connection: Connection, sql: str, parameters: tuple[Any, ...]) -> None:
    """`sql` on the DB-API cursor of `connection`. A driver error takes SQLAlchemy's
    own path, as from `Connection.execute`: wrapped as `DBAPIError`, a lost connection
    invalidated; anything else (a client-side timeout) passes through unwrapped."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, parameters)
    except connection.dialect.loaded_dbapi.Error as error:
        connection._handle_dbapi_exception(error, sql, parameters, cursor, None)
    finally:
        cursor.close()
