"""The ASGI lifespan: engine up, database reachable, `init_db` (migrations), engine down.

It is a plain ASGI layer rather than Starlette's lifespan hook so that a
database that stays down ends startup with one clear line (sent as the
`lifespan.startup.failed` message) instead of a traceback.
"""

from __future__ import annotations

import logging
import time

import anyio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.db import (
    ReplicaSet,
    SchemaMismatch,
    autocommit,
    create_engine,
    create_sessionmaker,
    dispose,
    init_db,
)
from service.errors import from_database_error
from service.metrics import observe_pool, record_replica_lag

logger = logging.getLogger(__name__)
# Well inside the 60 s a platform gives a process to bind its port.
STARTUP_DEADLINE_SECONDS = 20.0
FIRST_RETRY_DELAY_SECONDS = 0.25
MAX_RETRY_DELAY_SECONDS = 2.0


class StartupError(Exception):
    """The service cannot start; the message is the one line to show the operator."""


async def wait_for_database(
    engine: AsyncEngine,
    *,
    migrate: bool = False,
    deadline_seconds: float = STARTUP_DEADLINE_SECONDS,
) -> None:
    """Retry one round trip (and with `migrate`, `init_db`) with exponential backoff
    until it succeeds or time runs out; a transient failure of a migration (the
    database went away, the lock wait timed out) is retried like a connect."""
    url = engine.url.render_as_string(hide_password=True)
    give_up_at = time.monotonic() + deadline_seconds
    delay = FIRST_RETRY_DELAY_SECONDS
    attempt = 0
    while True:
        attempt += 1
        migrating = False
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            if migrate:
                migrating = True
                await init_db(engine)
            return
        except SchemaMismatch as exc:
            raise StartupError(f"init_db on {url}: {exc}") from exc
        except Exception as exc:
            reason = _describe(exc)
            if not _is_transient(exc):
                if migrating:
                    raise StartupError(f"init_db failed on {url}: {reason}") from exc
                # A wrong password or database name will not fix itself: say so now.
                raise StartupError(
                    f"database {url} refused the service: {reason}{_hint(exc)}"
                ) from exc
            if time.monotonic() + delay >= give_up_at:
                raise StartupError(
                    f"database {url} did not answer within {deadline_seconds:g} s "
                    f"({attempt} attempts; last error: {reason})"
                ) from exc
            logger.warning("database not reachable yet (%s); retrying in %.2g s", reason, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)


def _is_transient(exc: Exception) -> bool:
    """Down, unreachable, starting up or overloaded: worth waiting for."""
    error = from_database_error(exc)
    return error is not None and error.status == 503


def _hint(exc: Exception) -> str:
    """What the operator most likely has to change, for errors that have one answer."""
    if "prepared statement" in str(exc):
        return " (if DATABASE_URL points at PgBouncer in transaction mode, set DB_PGBOUNCER=true)"
    return ""


def _describe(exc: BaseException) -> str:
    """The driver's error class and first line (drivers never put the password there)."""
    orig = getattr(exc, "orig", None)
    cause = getattr(orig, "__cause__", None) or orig or exc  # the driver's own class
    first_line = next(iter(str(cause).splitlines()), "")
    return f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__


async def start(settings: Settings) -> AsyncEngine:
    """Create the engine, wait for the database, and bring its schema to the latest
    revision when INIT_DB is on."""
    engine = create_engine(settings)
    try:
        await wait_for_database(engine, migrate=settings.init_db)
    except BaseException:
        await dispose(engine)
        raise
    return engine


async def start_replicas(settings: Settings) -> ReplicaSet | None:
    """The replicas' pools and one monitor round, so reads can use them at once; a
    replica that is down does not hold up startup (it gets no reads until it is up)."""
    if not settings.database_replica_urls:
        return None
    replicas = ReplicaSet.create(settings)
    await replicas.poll()
    for entry in replicas.report():
        logger.info("replica %s: %s", entry["name"], entry.get("error") or entry["status"])
    return replicas


def log_connection_budget(settings: Settings) -> None:
    """One line an operator can add up against the database's connection limit."""
    source = (
        "DATABASE_CONNECTION_POOL_URL (PgBouncer, transaction mode)"
        if settings.via_connection_pool
        else "DATABASE_URL" + (" (PgBouncer, transaction mode)" if settings.db_pgbouncer else "")
    )
    replicas = len(settings.database_replica_urls)
    logger.info(
        "database %s from %s; this process may open up to %d connections "
        "(DB_POOL_SIZE %d + DB_MAX_OVERFLOW %d%s)",
        settings.safe_database_url,
        source,
        settings.connections_per_process,
        settings.db_pool_size,
        settings.db_max_overflow,
        f", for the primary and each of {replicas} replica(s), plus {replicas + 1} "
        "for the replica monitor"
        if replicas
        else "",
    )


class Lifespan:
    """Handles the `lifespan` scope; everything else goes to the app.

    On startup it puts `settings`, `engine` (and its `autocommit_engine` view
    for reads), the one `sessionmaker` and `replicas` (a `ReplicaSet`, or None
    without DATABASE_REPLICA_URLS) in the lifespan state, which the server
    copies into every request's scope. The replica monitor runs until shutdown.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        try:
            engine = await start(self.settings)
        except StartupError as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        log_connection_budget(self.settings)
        if not self.settings.api_keys:
            logger.warning("API_KEYS is not set: every route is open to anyone who can reach it")
        replicas = await start_replicas(self.settings)
        if self.settings.metrics_enabled:
            # Here, in the worker, not in `start`: the server's parent process runs
            # `start` too, and must not count a pool it closes at once.
            observe_pool(engine.pool, name="primary")  # type: ignore[arg-type]
            if replicas is not None:
                replicas.on_lag = record_replica_lag
                for replica in replicas.replicas:
                    observe_pool(replica.engine.pool, name=replica.name)  # type: ignore[arg-type]
        scope.setdefault("state", {}).update(
            settings=self.settings,
            engine=engine,
            autocommit_engine=autocommit(engine),
            sessionmaker=create_sessionmaker(engine),
            replicas=replicas,
        )
        async with anyio.create_task_group() as tasks:
            if replicas is not None:
                tasks.start_soon(replicas.run)
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            tasks.cancel_scope.cancel()
        await dispose(engine, *(replicas.engines() if replicas is not None else ()))
        await send({"type": "lifespan.shutdown.complete"})
