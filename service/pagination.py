"""Keyset pagination: an opaque cursor names the last row seen, never an offset,
so pages stay stable while rows are added."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, bindparam, tuple_
from starlette.requests import Request

from service.errors import ValidationFailed

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
# An issued cursor is about 90 characters; a longer one is not ours.
MAX_CURSOR_CHARS = 200


@dataclass(frozen=True)
class Cursor:
    """The sort key of the last row on a page: (timestamp, uid)."""

    at: datetime
    uid: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps([self.at.isoformat(), self.uid.hex]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Accept exactly what `encode` makes: anything else is a 422, never a 500
        nor a value the database driver cannot bind."""
        invalid = ValidationFailed.single(["query", "cursor"], "not a cursor this service issued")
        if len(token) > MAX_CURSOR_CHARS:
            raise invalid
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if not (
                isinstance(decoded, list)
                and len(decoded) == 2
                and all(isinstance(part, str) for part in decoded)
            ):
                raise invalid
            at = datetime.fromisoformat(decoded[0])
            uid = uuid.UUID(hex=decoded[1])
        except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise invalid from exc
        if at.utcoffset() != timedelta(0):  # the service only issues UTC cursors
            raise invalid
        return cls(at=at, uid=uid)


@dataclass(frozen=True)
class PageRequest:
    limit: int
    after: Cursor | None

    @classmethod
    def from_request(cls, request: Request) -> PageRequest:
        """Read `?limit=` (1-200, default 50) and `?cursor=`; a bad value is a 422."""
        raw_limit = request.query_params.get("limit")
        limit = DEFAULT_LIMIT
        if raw_limit is not None:
            # At most 3 ASCII digits before int(): thousands of digits make it raise.
            if not (len(raw_limit) <= 3 and raw_limit.isascii() and raw_limit.isdigit()) or not (
                1 <= int(raw_limit) <= MAX_LIMIT
            ):
                raise ValidationFailed.single(
                    ["query", "limit"], f"must be a whole number from 1 to {MAX_LIMIT}"
                )
            limit = int(raw_limit)
        raw_cursor = request.query_params.get("cursor")
        return cls(limit=limit, after=Cursor.decode(raw_cursor) if raw_cursor else None)

    def params(self) -> dict[str, Any]:
        """The values of `keyset`'s bound parameters for this page."""
        if self.after is None:
            return {"limit": self.limit + 1}
        return {"limit": self.limit + 1, "after_at": self.after.at, "after_uid": self.after.uid}


def keyset(
    statement: Select[Any],
    *,
    at: ColumnElement[datetime],
    uid: ColumnElement[uuid.UUID],
    after: bool,
    newest_first: bool = False,
) -> Select[Any]:
    """Order by (at, uid), start after the cursor (when `after`), and fetch one row
    more than the page holds to learn whether another page follows. The values are
    bound parameters (`PageRequest.params`), so each shape is built once."""
    if after:
        key, seen = (
            tuple_(at, uid),
            tuple_(bindparam("after_at", type_=at.type), bindparam("after_uid", type_=uid.type)),
        )
        statement = statement.where(key < seen if newest_first else key > seen)
    order = (at.desc(), uid.desc()) if newest_first else (at.asc(), uid.asc())
    return statement.order_by(*order).limit(bindparam("limit", type_=Integer))


def cursor_after(row: Mapping[str, Any], *, key: str) -> str:
    """The cursor of the page that follows `row`."""
    return Cursor(at=row[key], uid=row["uid"]).encode()
