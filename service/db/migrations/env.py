"""Alembic's environment for this service.

`init_db` hands over its own connection (locked, in a transaction) through
`config.attributes["connection"]`. Run from the command line (`alembic upgrade
head`, `alembic revision --autogenerate`, `alembic check`), it connects the way
the service does: DATABASE_URL (or DATABASE_CONNECTION_POOL_URL) read by the
service's settings, with the same URL normalisation and PgBouncer behaviour,
and takes the same lock.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from alembic import context
from alembic.operations.ops import MigrationScript
from sqlalchemy import Connection
from sqlmodel import SQLModel

from service import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from service.config import load_settings
from service.db.compare import context_options
from service.db.engine import create_engine
from service.db.schema import migration_connection, next_revision_id
from service.logs import configure_logging

config = context.config
target_metadata = SQLModel.metadata


def number_revision(_: Any, __: Any, directives: list[MigrationScript]) -> None:
    """Name a new revision 0002, 0003, ... (unless --rev-id says otherwise), and
    write no file when autogenerate found nothing to change."""
    script = directives[0]
    options = config.cmd_opts
    if getattr(options, "autogenerate", False) and script.upgrade_ops_list[-1].is_empty():
        print("No changes in schema detected; no revision written.")
        directives[:] = []
        return
    if getattr(options, "rev_id", None) is None:
        script.rev_id = next_revision_id(context.script)


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        process_revision_directives=number_revision,
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_command_line() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    engine = create_engine(replace(settings, db_pool_size=1, db_max_overflow=0))
    try:
        async with migration_connection(engine) as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=load_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        **context_options(),
    )
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    run_migrations(shared)
else:
    asyncio.run(run_from_command_line())
