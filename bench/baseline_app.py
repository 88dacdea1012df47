"""The baseline the service is measured against: plain Starlette, one asyncpg pool
of the service's size, hand-written SQL and stdlib `json`.

It serves the benchmarked routes with the service's paths, status codes, headers
and JSON shapes, and is meant to be the fastest straightforward way to write
them, not a straw man: each request is one statement on a pooled connection (no
transaction block, no ORM, no per-request session), and the pool skips asyncpg's
reset query on release because nothing here changes session state (it still
rolls back a transaction left open). It expects the tables that the service's
`python -m service init-db` creates.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/db \\
        uvicorn --app-dir bench baseline_app:app
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
POOL_SIZE = int(os.environ.get("DB_POOL_SIZE", "5"))
MAX_OVERFLOW = int(os.environ.get("DB_MAX_OVERFLOW", "5"))
STATEMENT_TIMEOUT_MS = int(os.environ.get("DB_STATEMENT_TIMEOUT_MS", "15000"))
MAX_BODY_BYTES = int(os.environ.get("MAX_BODY_BYTES", "1048576"))
HEALTH_TIMEOUT_SECONDS = 2.0
DEFAULT_LIMIT, MAX_LIMIT = 50, 200

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
HEALTH_TYPE = "application/health+json"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# Selected in the order the service's UserPublic serialises its fields.
_COLUMNS = (
    "uid, username, email, first_name, last_name, role, is_verified,"
    " verified_at, created_at, updated_at"
)
SELECT_USER = f"SELECT {_COLUMNS} FROM users WHERE uid = $1"
LIST_FIRST = f"SELECT {_COLUMNS} FROM users ORDER BY created_at, uid LIMIT $1"
LIST_AFTER = (
    f"SELECT {_COLUMNS} FROM users WHERE (created_at, uid) > ($1, $2)"
    " ORDER BY created_at, uid LIMIT $3"
)
INSERT_USER = f"INSERT INTO users ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"

_TEXT_FIELDS = {"username": 64, "email": 254, "first_name": 100, "last_name": 100}
_OPTIONAL_FIELDS = {"role", "is_verified"}
_ROLES = ("user", "admin")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


class _Db:
    """The process's one pool, set by the lifespan (a global: the cheapest lookup)."""

    pool: asyncpg.Pool


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release hook: nothing here sets session state, so no reset round trip is needed."""


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The same pool bounds as the service: DB_POOL_SIZE kept, DB_MAX_OVERFLOW more."""
    _Db.pool = await asyncpg.create_pool(
        DATABASE_URL,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE + MAX_OVERFLOW,
        reset=_keep_session,
        command_timeout=STATEMENT_TIMEOUT_MS / 1000 + 1,
        server_settings={"statement_timeout": str(STATEMENT_TIMEOUT_MS)},
    )
    try:
        yield
    finally:
        await _Db.pool.close()


# -- rendering -------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a `Z`, as pydantic writes it for the service."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _etag(updated_at: datetime) -> str:
    return f'"{(updated_at - _EPOCH) // _MICROSECOND:x}"'


def _user(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row (or the values just inserted) as the service's UserPublic JSON."""
    return {
        "uid": str(row["uid"]),
        "username": row["username"],
        "email": row["email"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "role": row["role"],
        "is_verified": row["is_verified"],
        "verified_at": _iso(row["verified_at"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
    }


def _json(
    body: object,
    *,
    status: int = 200,
    media_type: str = JSON_TYPE,
    request_id: str | None = None,
    **headers: str,
) -> Response:
    """Compact UTF-8 JSON with the service's X-Request-ID header, so bytes on the wire match."""
    headers["X-Request-ID"] = request_id or uuid.uuid4().hex
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Response(text, status_code=status, headers=headers, media_type=media_type)


def _problem(status: int, detail: str, **extra: object) -> Response:
    """RFC 9457 problem+json, with the request id in the body as the service has it."""
    request_id = uuid.uuid4().hex
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
        **extra,
    }
    return _json(body, status=status, media_type=PROBLEM_TYPE, request_id=request_id)


def _invalid(loc: list[str], msg: str) -> Response:
    return _problem(422, "the request is not valid; see errors", errors=[{"loc": loc, "msg": msg}])


# -- /users ------------------------------------------------------------------------


async def read_user(request: Request) -> Response:
    row = await _Db.pool.fetchrow(SELECT_USER, request.path_params["uid"])
    if row is None:
        return _problem(404, "user not found")
    return _json(_user(row), ETag=_etag(row["updated_at"]))


def _user_errors(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The essentials of UserCreate: required strings in bounds, no NUL, a plausible
    email, a known role, a real boolean, and nothing else."""
    errors = [
        {"loc": ["body", key], "msg": "Extra inputs are not permitted"}
        for key in data.keys() - _TEXT_FIELDS.keys() - _OPTIONAL_FIELDS
    ]
    for name, max_length in _TEXT_FIELDS.items():
        value = data.get(name)
        if not isinstance(value, str) or not 1 <= len(value) <= max_length or "\x00" in value:
            errors.append({"loc": ["body", name], "msg": f"must be 1-{max_length} characters"})
    if isinstance(data.get("email"), str) and not _EMAIL.fullmatch(data["email"]):
        errors.append({"loc": ["body", "email"], "msg": "value is not a valid email address"})
    if data.get("role", "user") not in _ROLES:
        errors.append({"loc": ["body", "role"], "msg": "must be 'user' or 'admin'"})
    if not isinstance(data.get("is_verified", False), bool):
        errors.append({"loc": ["body", "is_verified"], "msg": "must be a boolean"})
    return errors


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The body as a JSON object, or the 415/413/400 problem the service would send."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_TYPE:
        return _problem(415, "the body must be application/json")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _problem(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        return _problem(400, f"the body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return _problem(400, "the body must be a JSON object")
    return data


async def create_user(request: Request) -> Response:
    data = await _json_object(request)
    if isinstance(data, Response):
        return data
    errors = _user_errors(data)
    if errors:
        return _problem(422, "the request is not valid; see errors", errors=errors)
    now = datetime.now(UTC)
    is_verified = data.get("is_verified", False)
    user = {
        "uid": uuid.uuid4(),
        "username": data["username"],
        "email": data["email"],
        "first_name": data["first_name"],
        "last_name": data["last_name"],
        "role": data.get("role", "user"),
        "is_verified": is_verified,
        "verified_at": now if is_verified else None,
        "created_at": now,
        "updated_at": now,
    }
    try:
        await _Db.pool.execute(INSERT_USER, *user.values())
    except asyncpg.UniqueViolationError:
        return _problem(409, "a user with this email already exists")
    return _json(_user(user), status=201, ETag=_etag(now), Location=f"/users/{user['uid']}")


def _encode_cursor(at: datetime, uid: uuid.UUID) -> str:
    """The service's cursor format, so either app accepts the other's cursors."""
    raw = json.dumps([at.isoformat(), uid.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(token: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        at, uid = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = datetime.fromisoformat(at), uuid.UUID(hex=uid)
    except (binascii.Error, ValueError, TypeError):
        return None
    return cursor if cursor[0].tzinfo is not None else None


def _limit(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_LIMIT
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT:
        return int(raw)
    return None


async def list_users(request: Request) -> Response:
    """Keyset pagination by (created_at, uid), one row more than the page to see a next page."""
    limit = _limit(request.query_params.get("limit"))
    if limit is None:
        return _invalid(["query", "limit"], f"must be a whole number from 1 to {MAX_LIMIT}")
    token = request.query_params.get("cursor")
    if token:
        after = _decode_cursor(token)
        if after is None:
            return _invalid(["query", "cursor"], "not a cursor this service issued")
        rows = await _Db.pool.fetch(LIST_AFTER, *after, limit + 1)
    else:
        rows = await _Db.pool.fetch(LIST_FIRST, limit + 1)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]["created_at"], rows[-1]["uid"])
    return _json({"items": [_user(row) for row in rows], "next_cursor": next_cursor})


# -- /health -----------------------------------------------------------------------


def _health(body: object, status: int = 200) -> Response:
    return _json(body, status=status, media_type=HEALTH_TYPE, **{"Cache-Control": "no-store"})


async def _database_answers() -> bool:
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
            await _Db.pool.fetchval("SELECT 1")
    except Exception:
        return False
    return True


async def read_health(request: Request) -> Response:
    """Readiness: one SELECT 1 under a short timeout, with the pool's figures."""
    started = time.perf_counter()
    ok = await _database_answers()
    status = "pass" if ok else "fail"
    opened = _Db.pool.get_size()
    check = {
        "componentType": "datastore",
        "status": status,
        "observedValue": round((time.perf_counter() - started) * 1000, 3),
        "observedUnit": "ms",
        "time": _iso(datetime.now(UTC)),
    }
    body = {
        "status": status,
        "checks": {"database:responseTime": [check]},
        "pool": {
            "size": POOL_SIZE,
            "checked_out": opened - _Db.pool.get_idle_size(),
            "overflow": max(opened - POOL_SIZE, 0),
        },
    }
    return _health(body, 200 if ok else 503)


async def read_liveness(request: Request) -> Response:
    return _health({"status": "pass"})


app = Starlette(
    routes=[
        Route("/health", read_health),
        Route("/health/live", read_liveness),
        Route("/users", list_users),
        Route("/users", create_user, methods=["POST"]),
        Route("/users/{uid:uuid}", read_user),
    ],
    lifespan=lifespan,
)
