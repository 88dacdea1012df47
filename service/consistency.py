"""Read-your-writes across requests: the consistency token.

A successful write answers with `X-Consistency-Token` and a cookie holding
the same value: the primary's WAL position read right after the commit, as
PostgreSQL prints it (`X/Y`, hex). A read that presents it (header or
cookie) is served by a replica only once that replica has replayed past
it. A malformed token is ignored; so is an expired cookie, which is fine:
after DB_REPLICA_MAX_LAG_MS every replica allowed to serve reads holds the
write anyway.
"""

from __future__ import annotations

import logging
import math

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import cookie_parser

from service.db import format_lsn, parse_lsn

logger = logging.getLogger(__name__)
CONSISTENCY_HEADER = "X-Consistency-Token"
CONSISTENCY_COOKIE = "consistency_token"
# The cookie outlives the lag bound by this much, for clocks and transit.
COOKIE_MARGIN_SECONDS = 2
# When the position cannot be read after a commit: a token no replica reaches,
# so the writer's reads go to the primary until the cookie expires.
UNREACHABLE_LSN = (1 << 64) - 1


def presented_token(headers: Headers) -> int | None:
    """The newest well-formed token the request carries (header or cookie), if any."""
    candidates = [headers.get(CONSISTENCY_HEADER, "")]
    if "cookie" in headers:
        candidates.append(cookie_parser(headers["cookie"]).get(CONSISTENCY_COOKIE, ""))
    positions = [lsn for lsn in map(parse_lsn, candidates) if lsn is not None]
    return max(positions, default=None)


async def write_position(primary: AsyncEngine) -> int:
    """The primary's WAL position now, which is past the request's commit: one round
    trip, on a connection the committed session has already returned to the pool."""
    try:
        async with primary.connect() as connection:
            text = (await connection.exec_driver_sql("SELECT pg_current_wal_lsn()::text")).scalar()
    except Exception as exc:
        logger.warning("could not read the WAL position after a write: %s", type(exc).__name__)
        return UNREACHABLE_LSN
    return parse_lsn(text or "") or UNREACHABLE_LSN


def attach_token(message_headers: MutableHeaders, lsn: int, *, max_lag: float) -> None:
    """The header for clients that carry it themselves, and the cookie for browsers;
    `max_lag` is the replicas' bound in seconds."""
    token = format_lsn(lsn)
    max_age = math.ceil(max_lag) + COOKIE_MARGIN_SECONDS
    message_headers.append(CONSISTENCY_HEADER, token)
    message_headers.append(
        "Set-Cookie",
        f"{CONSISTENCY_COOKIE}={token}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax",
    )
