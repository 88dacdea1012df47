"""`init_db`: the schema the models describe, created once however many
processes start at the same time."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from service import models  # noqa: F401  (registers the tables on SQLModel.metadata)

# pg_advisory_xact_lock key that serialises init_db across workers and dynos.
INIT_DB_LOCK_KEY = 0x5E55_1017


async def init_db(engine: AsyncEngine) -> None:
    """Create missing tables. Idempotent; on PostgreSQL an advisory lock lets
    several workers run it at once on an empty database."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": INIT_DB_LOCK_KEY}
            )
        await connection.run_sync(SQLModel.metadata.create_all)
