"""The engine (pool and timeouts from settings), its autocommit view for reads,
and the one sessionmaker."""

from __future__ import annotations

import logging
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlmodel import Session
from sqlmodel.ext.asyncio.session import AsyncSession

from service.config import Settings
from service.db.pool import FairAsyncQueuePool, terminate_idle

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_SECONDS = 5.0
# How long shutdown closes connections politely (each close is a round trip)
# before it drops the rest: with the Procfile's 20 s graceful shutdown this ends
# well inside the 30 s a platform waits before SIGKILL, database answering or not.
DISPOSE_SECONDS = 5.0
# Client-side bound on a command beyond the server's statement_timeout, so a
# server that silently stops answering cannot hold a request forever.
COMMAND_TIMEOUT_MARGIN_SECONDS = 1.0
# The replica monitor's connections: a server that does not answer within this
# is reported down rather than waited for.
MONITOR_TIMEOUT_SECONDS = 1.0
SQLITE_BUSY_TIMEOUT_SECONDS = 5.0


def _postgres_connect_args(settings: Settings) -> dict[str, Any]:
    statement_timeout = settings.db_statement_timeout_ms / 1000
    if settings.db_pgbouncer:
        # PgBouncer (transaction mode) rejects statement_timeout as a startup
        # parameter and may hand every Sync outside a transaction (autocommit
        # reads) to a different server connection, so no server-side prepared
        # statement may outlive the message batch that uses it: rely on the
        # client timeout, and with both caches off asyncpg (>= 0.29) prepares
        # statements unnamed and parses them again in the Bind/Execute batch.
        # (Unique names instead would still leave Bind on another server
        # connection in autocommit: "prepared statement ... does not exist".)
        return {
            "timeout": CONNECT_TIMEOUT_SECONDS,
            "command_timeout": statement_timeout,
            "statement_cache_size": 0,
            "prepared_statement_cache_size": 0,
            # asyncpg's default 'utf-8' never matches the server's UTF8 in
            # PgBouncer's eyes, which then sends SET client_encoding before
            # every transaction: one round trip each, for nothing.
            "server_settings": {"client_encoding": "UTF8"},
        }
    return {
        "timeout": CONNECT_TIMEOUT_SECONDS,
        "command_timeout": statement_timeout + COMMAND_TIMEOUT_MARGIN_SECONDS,
        "server_settings": {"statement_timeout": str(settings.db_statement_timeout_ms)},
    }


def _configure_sqlite(dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry) -> None:
    """Per connection: SQLite enforces foreign keys (so ON DELETE CASCADE) only when
    asked, and WAL lets readers go on while one request writes."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _refuse_closed_connection(
    dbapi_connection: DBAPIConnection, _: ConnectionPoolEntry, __: PoolProxiedConnection
) -> None:
    """At checkout: asyncpg notices when the server closes the socket of an idle
    connection (a restart, a failover, pg_terminate_backend), so a dead one is
    known without a round trip; DisconnectionError makes the pool replace it
    before a request gets it."""
    driver_connection: Any = dbapi_connection.driver_connection  # type: ignore[attr-defined]
    if driver_connection is not None and driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def create_engine(settings: Settings, *, url: URL | None = None) -> AsyncEngine:
    """An engine for DATABASE_URL, or for `url` (a replica) with the same settings;
    each has a pool sized by DB_POOL_SIZE and DB_MAX_OVERFLOW."""
    if settings.is_postgres:
        connect_args = _postgres_connect_args(settings)
    else:
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
    engine = create_async_engine(
        url or settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        poolclass=FairAsyncQueuePool,
        connect_args=connect_args,
        # Bound values are emails and prompts: never render them into an exception
        # message, and so never into a log line or traceback.
        hide_parameters=True,
    )
    if settings.is_postgres:
        event.listen(engine.sync_engine, "checkout", _refuse_closed_connection)
    else:
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
    return engine


def create_monitor_engine(settings: Settings, *, url: URL) -> AsyncEngine:
    """One autocommit connection to `url` for the replica monitor, apart from the
    request pools so that a busy pool cannot blind it; every wait is short."""
    connect_args = {
        **_postgres_connect_args(settings),
        "timeout": MONITOR_TIMEOUT_SECONDS,
        "command_timeout": MONITOR_TIMEOUT_SECONDS,
    }
    engine = create_async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=MONITOR_TIMEOUT_SECONDS,
        isolation_level="AUTOCOMMIT",
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "checkout", _refuse_closed_connection)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Objects stay readable after commit, so handlers serialise them without a reload."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same engine and pool, without BEGIN/ROLLBACK around each use.

    For reads only: at READ COMMITTED each statement sees its own snapshot
    anyway, so a transaction around a read buys nothing but two round trips.
    """
    return engine.execution_options(isolation_level="AUTOCOMMIT")


class ReadOnlySession(Session):
    """The sync half of a GET/HEAD request's session, which runs in autocommit:
    a flush there would write without a transaction, so it is refused."""


@event.listens_for(ReadOnlySession, "before_flush")
def _refuse_flush(session: Session, *_: object) -> None:
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("a GET or HEAD handler tried to write to the database")


async def dispose(*engines: AsyncEngine, within: float = DISPOSE_SECONDS) -> None:
    """Close the engines' pooled connections, politely for up to `within` seconds
    in all, then by dropping them: a server that stopped answering would otherwise
    hold each close for the command timeout, one after the other."""
    with anyio.move_on_after(within):
        async with anyio.create_task_group() as tasks:
            for engine in engines:
                tasks.start_soon(engine.dispose)
        return
    dropped = sum(terminate_idle(engine.pool) for engine in engines)
    logger.warning(
        "the database did not answer within %g s while its connections were closed; "
        "dropped the %d left",
        within,
        dropped,
    )


def pool_status(engine: AsyncEngine) -> dict[str, int]:
    """The pool's figures for /health: configured size, connections in use, overflow in use."""
    pool: Any = engine.pool
    return {
        "size": pool.size(),
        "checked_out": pool.checkedout(),
        "overflow": max(pool.overflow(), 0),
    }
