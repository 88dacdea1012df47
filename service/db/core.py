"""Core statements on a session's own connection, for the hot paths.

`session.execute` runs every statement through the ORM's execution layer (its
compile state, event hooks, result wrapping), which for a single-row INSERT or
SELECT costs more than building the statement. A statement built once at import
with bound parameters, run here, skips that and the per-request statement build
while staying inside the session's transaction (same connection, same commit or
rollback), on either backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import CursorResult, Executable
from sqlmodel.ext.asyncio.session import AsyncSession


async def execute(
    session: AsyncSession, statement: Executable, params: Mapping[str, Any]
) -> CursorResult[Any]:
    """`statement` with `params` on the connection of `session`'s transaction."""
    connection = await session.connection()
    return await connection.execute(statement, params)
