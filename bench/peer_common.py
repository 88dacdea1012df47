"""What the two peers (bench/peer_seed.py, bench/peer_advanced_alchemy.py) share: their
settings, the request and response models, the page cursor and the health bodies.

The peers serve the benchmarked slice of the service's API (`GET /users/{uid}`,
`POST /users`, `GET /users?limit=&cursor=`, `/health`, `/health/live`) with the same
JSON bodies, so a difference in req/s is the framework's and not the work's. They run
in bench/.venv-peers (bench/peers-requirements.txt), never in the service's venv, and
expect the `users` table that the harness creates with the service's `init-db`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from pydantic import ConfigDict, EmailStr
from sqlalchemy import String
from sqlalchemy.pool import Pool
from sqlmodel import Field, SQLModel

# The harness passes the service's settings; a peer takes the URL and the pool bounds.
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ASYNC_DATABASE_URL = DATABASE_URL.replace("postgresql://", "postgresql+asyncpg://", 1)
POOL_SIZE = int(os.environ.get("DB_POOL_SIZE", "5"))
MAX_OVERFLOW = int(os.environ.get("DB_MAX_OVERFLOW", "5"))

DEFAULT_LIMIT, MAX_LIMIT = 50, 200
HEALTH_TIMEOUT_SECONDS = 2.0
HEALTH_MEDIA_TYPE = "application/health+json"
NO_STORE = {"Cache-Control": "no-store"}
LIVE_BODY = b'{"status":"pass"}'

Role = Literal["user", "admin"]


def utc_now() -> datetime:
    return datetime.now(UTC)


# -- models: the service's field rules, in the seed's SQLModel family style ---------------


class UserBase(SQLModel):
    username: str = Field(min_length=1, max_length=64)
    email: EmailStr = Field(max_length=254)
    first_name: str = Field(min_length=1, max_length=100)
    last_name: str = Field(min_length=1, max_length=100)
    role: Role = Field(default="user", sa_type=String(16))
    is_verified: bool = False


class UserCreate(UserBase):
    """A POST body: unknown fields and loose types rejected, as the service does."""

    model_config = ConfigDict(extra="forbid", strict=True)


class UserPublic(SQLModel):
    uid: uuid.UUID
    username: str
    email: str
    first_name: str
    last_name: str
    role: Role
    is_verified: bool
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime


class UserPage(SQLModel):
    items: list[UserPublic]
    next_cursor: str | None


# -- pages ---------------------------------------------------------------------------


class Keyed(Protocol):
    created_at: datetime
    uid: uuid.UUID


RowT = TypeVar("RowT", bound=Keyed)


def encode_cursor(at: datetime, uid: uuid.UUID) -> str:
    """The service's cursor format, so a peer's next_cursor matches the service's."""
    raw = json.dumps([at.isoformat(), uid.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID] | None:
    """(created_at, uid) after which the page starts; None for a token we did not issue."""
    try:
        at, uid = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after = datetime.fromisoformat(at), uuid.UUID(hex=uid)
    except (binascii.Error, ValueError, TypeError):
        return None
    return after if after[0].tzinfo is not None else None


def split_page(rows: Sequence[RowT], limit: int) -> tuple[Sequence[RowT], str | None]:
    """The rows to send and the next page's cursor: the query fetched `limit + 1` rows."""
    if len(rows) <= limit:
        return rows, None
    items = rows[:limit]
    return items, encode_cursor(items[-1].created_at, items[-1].uid)


# -- health --------------------------------------------------------------------------


def readiness(ok: bool, started: float, pool: Pool) -> dict[str, Any]:
    """The service's /health body: the check's time and the pool's figures."""
    status = "pass" if ok else "fail"
    check = {
        "componentType": "datastore",
        "status": status,
        "observedValue": round((time.perf_counter() - started) * 1000, 3),
        "observedUnit": "ms",
        "time": utc_now().isoformat().replace("+00:00", "Z"),
    }
    figures: Any = pool  # QueuePool's counters are not on the Pool base class
    return {
        "status": status,
        "checks": {"database:responseTime": [check]},
        "pool": {
            "size": figures.size(),
            "checked_out": figures.checkedout(),
            "overflow": max(figures.overflow(), 0),
        },
    }
