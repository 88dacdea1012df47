"""Idempotency-Key on POST: a retried create gets its first response back instead
of making a duplicate (contract, "Idempotent retries").

A keyed POST runs in one transaction, on the request's session:

1. `run` claims the key before the handler writes anything: it inserts the
   key's row (or takes over an expired one) with the request's fingerprint;
2. the handler writes, builds its response, and calls `save` just before its
   commit, which stores status, Location, ETag and body in the key's row: the
   resource and its key commit together, or roll back together;
3. a later request with the same key finds the committed row: the same request
   gets the stored response again (`replay`), another request a 422.

On PostgreSQL the claim is one statement that also takes a transaction-scoped
advisory lock on the key: a duplicate arriving while the first still runs
cannot take it, and gets 409 at once instead of waiting. The unique key decides
every race, so concurrent duplicates make one resource. On SQLite a write
transaction holds the database's write lock, so a duplicate waits for the first
to commit and then replays it.

Only successes are stored: a failed request rolls its claim back with the rest,
so its retry runs again (a 4xx for a bad body would come out the same; a 404,
409 or 503 may not). Each claim also deletes a few expired keys, so the table
stays bounded without a separate process.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, LargeBinary, String, bindparam, delete, select, text, tuple_, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service.errors import BadRequest, Conflict, ValidationFailed
from service.inputs import bearer_token, read_bytes
from service.models import IdempotencyKey, UTCDateTime, utc_now

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
VALID_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")
# The one scope of every caller when API_KEYS is unset (a caller's is 64 hex digits).
OPEN_SCOPE = "open"
# Expired keys each claim deletes: more than the one it adds, so pruning keeps up.
PRUNE_BATCH = 10
IN_FLIGHT_RETRY_AFTER = "1"

_TABLE = IdempotencyKey.__table__
# One round trip on PostgreSQL. Every writer of a key's row holds the key's
# advisory lock, taken with "try" (never waiting): its claimer, for the whole
# transaction, or a pruner deleting it. So nothing here waits on a row lock,
# and a duplicate of a request still running finds `locked` false. All the
# CTEs run, on the snapshot of the statement's start: `stored` is the row
# committed before it, when the claim found a live one.
_CLAIM_POSTGRES = (
    text(
        """
WITH key_lock AS (
    SELECT pg_try_advisory_xact_lock(hashtextextended(:scope || ' ' || :key, 0)) AS locked
), pruned AS (
    DELETE FROM idempotency_keys
    WHERE (scope, key) IN (
        SELECT scope, key FROM (
            SELECT scope, key FROM idempotency_keys
            WHERE created_at < :expired_before AND (scope, key) <> (:scope, :key)
            ORDER BY created_at
            LIMIT :prune_batch
        ) AS expired  -- limited first, so only these few are ever locked
        WHERE pg_try_advisory_xact_lock(hashtextextended(scope || ' ' || key, 0))
    )
), claimed AS (
    INSERT INTO idempotency_keys (scope, key, fingerprint, created_at)
    SELECT :scope, :key, :fingerprint, :now FROM key_lock WHERE locked
    ON CONFLICT (scope, key) DO UPDATE
        SET fingerprint = excluded.fingerprint, created_at = excluded.created_at,
            status = NULL, location = NULL, etag = NULL, body = NULL
        WHERE idempotency_keys.created_at < :expired_before
    RETURNING 1
)
SELECT key_lock.locked, EXISTS (SELECT FROM claimed) AS claimed, stored.fingerprint,
       stored.status, stored.location, stored.etag, stored.body
FROM key_lock LEFT JOIN idempotency_keys AS stored ON stored.scope = :scope AND stored.key = :key
"""
    )
    .bindparams(
        bindparam("scope", type_=String()),
        bindparam("key", type_=String()),
        bindparam("fingerprint", type_=String()),
        bindparam("now", type_=UTCDateTime()),
        bindparam("expired_before", type_=UTCDateTime()),
        bindparam("prune_batch", type_=Integer()),
    )
    .columns(status=Integer(), body=LargeBinary())
)

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Claim:
    """A key this request holds; `save` stores its response in the key's row."""

    scope: str
    key: str


@dataclass(frozen=True)
class Stored:
    """A committed key's row: the request it was used for and the response it got."""

    fingerprint: str
    status: int | None
    location: str | None
    etag: str | None
    body: bytes | None


def valid_key(request: Request) -> str:
    """The header's value, as sent; 400 unless it is 1-255 printable ASCII characters."""
    values = request.headers.getlist(HEADER)
    if len(values) != 1 or not VALID_KEY.fullmatch(values[0]):
        raise BadRequest(
            f"{HEADER} must be one header of 1-{MAX_KEY_LENGTH} printable ASCII characters"
        )
    return values[0]


def caller_scope(request: Request) -> str:
    """Keys are per caller: a hash of the bearer key in use (never the key itself),
    or one shared scope when the service is open."""
    token = bearer_token(request.headers)
    if not request.state.settings.api_keys or token is None:
        return OPEN_SCOPE
    return hashlib.sha256(token.encode()).hexdigest()


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes a repeat "the same request": method, path and body bytes."""
    digest = hashlib.sha256(f"{method} {len(path)}:{path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def _in_flight() -> Conflict:
    return Conflict(
        f"a request with this {HEADER} is still running; retry shortly",
        headers={"Retry-After": IN_FLIGHT_RETRY_AFTER},
    )


async def _claim_postgres(
    session: AsyncSession,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    now: datetime,
    expired_before: datetime,
) -> Stored | None:
    """None when this request now holds the key; else the live row found for it."""
    params = {
        "scope": scope,
        "key": key,
        "fingerprint": fingerprint,
        "now": now,
        "expired_before": expired_before,
        "prune_batch": PRUNE_BATCH,
    }
    row = (await session.exec(_CLAIM_POSTGRES, params=params)).one()
    if row.claimed:
        return None
    if not row.locked or row.fingerprint is None:
        # Locked by a request still running; or it committed after this statement's
        # snapshot was taken, so its row is not visible yet: a retry will see it.
        raise _in_flight()
    return Stored(row.fingerprint, row.status, row.location, row.etag, row.body)


async def _claim_sqlite(
    session: AsyncSession,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    now: datetime,
    expired_before: datetime,
) -> Stored | None:
    """As `_claim_postgres`. The first write takes SQLite's write lock, so a duplicate
    waits here until the request holding it commits, then finds its row."""
    this_key = tuple_(_TABLE.c.scope, _TABLE.c.key)
    expired = (
        select(_TABLE.c.scope, _TABLE.c.key)
        .where(_TABLE.c.created_at < expired_before, this_key != (scope, key))
        .order_by(_TABLE.c.created_at)
        .limit(PRUNE_BATCH)
    )
    await session.exec(delete(_TABLE).where(this_key.in_(expired)))
    fresh = {"fingerprint": fingerprint, "created_at": now}
    upsert = sqlite_insert(_TABLE).values(scope=scope, key=key, **fresh)
    claimed = await session.exec(
        upsert.on_conflict_do_update(
            index_elements=[_TABLE.c.scope, _TABLE.c.key],
            set_={**fresh, "status": None, "location": None, "etag": None, "body": None},
            where=_TABLE.c.created_at < expired_before,
        ).returning(_TABLE.c.scope)
    )
    if claimed.first() is not None:
        return None
    row = (
        await session.exec(
            select(
                _TABLE.c.fingerprint,
                _TABLE.c.status,
                _TABLE.c.location,
                _TABLE.c.etag,
                _TABLE.c.body,
            ).where(this_key == (scope, key))
        )
    ).one()
    return Stored(*row)


async def run(request: Request, handler: Handler) -> Response:
    """Serve a POST that carries an Idempotency-Key: claim the key and run the
    handler (which calls `save`), or answer from the key's stored response."""
    key = valid_key(request)
    body = await read_bytes(request)
    scope = caller_scope(request)
    wanted = request_fingerprint(request.method, request.url.path, body)
    settings = request.state.settings
    now = utc_now()
    claim = _claim_postgres if settings.is_postgres else _claim_sqlite
    stored = await claim(
        request.state.db,
        scope=scope,
        key=key,
        fingerprint=wanted,
        now=now,
        expired_before=now - timedelta(seconds=settings.idempotency_ttl_seconds),
    )
    if stored is None:
        request.state.idempotency_claim = Claim(scope=scope, key=key)
        return await handler(request)
    if stored.fingerprint != wanted:
        raise ValidationFailed.single(
            ["header", HEADER],
            "this key was already used for a different request (method, path or body)",
        )
    if stored.status is None:
        raise _in_flight()  # only if a handler committed without `save`: never replay it
    return replay(
        status=stored.status, location=stored.location, etag=stored.etag, body=stored.body
    )


async def save(request: Request, response: Response) -> None:
    """Store the response in the request's key row, in the handler's transaction:
    call it just before the commit. Nothing happens for a request without a key."""
    claim: Claim | None = getattr(request.state, "idempotency_claim", None)
    if claim is None:
        return
    session: AsyncSession = request.state.db
    await session.exec(
        update(_TABLE)
        .where(_TABLE.c.scope == claim.scope, _TABLE.c.key == claim.key)
        .values(
            status=response.status_code,
            location=response.headers.get("location"),
            etag=response.headers.get("etag"),
            body=bytes(response.body),
        )
    )


def replay(*, status: int, location: str | None, etag: str | None, body: bytes | None) -> Response:
    """A stored response again, byte for byte, marked as a replay, and counted."""
    # Imported here: service.metrics imports service.routing, which imports this module.
    from service.metrics import record_idempotent_replay

    record_idempotent_replay()
    headers = {REPLAYED_HEADER: "true"}
    if location is not None:
        headers["Location"] = location
    if etag is not None:
        headers["ETag"] = etag
    return Response(body, status_code=status, headers=headers, media_type="application/json")
