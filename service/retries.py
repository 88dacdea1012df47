"""Running a handler again when PostgreSQL aborted its transaction to resolve a
conflict with another (SQLSTATE class 40: a deadlock, a serialization failure).

Such a transaction changed nothing, and handlers commit once, at the end, so
running the handler again from the start is safe for every method. After the
last attempt the error goes on to `service.problems`: a 409 with Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import DBAPIError
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service.errors import is_transaction_conflict, sqlstate_of

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
Handler = Callable[[Request], Awaitable[Response]]


async def run_with_retries(handler: Handler, request: Request) -> Response:
    """`handler(request)`, run up to MAX_ATTEMPTS times while it hits class-40 errors."""
    attempt = 1
    while True:
        try:
            return await handler(request)
        except DBAPIError as exc:
            if attempt == MAX_ATTEMPTS or not is_transaction_conflict(exc):
                raise
            attempt += 1
            logger.info(
                "transaction aborted (SQLSTATE %s); running it again (attempt %d of %d)",
                sqlstate_of(exc),
                attempt,
                MAX_ATTEMPTS,
            )
            # Open the session only if the handler did (get() does not open one).
            session: AsyncSession | None = request.scope["state"].get("db")
            if session is not None:
                await session.rollback()
