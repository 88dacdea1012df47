"""Turning stored rows into JSON responses: public models, pages, ETags."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import SQLModel
from starlette.responses import Response

from service.pagination import PageRequest, cursor_after

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A page stops adding items past about this size: 200 messages of 100,000
# characters each would otherwise be a body of hundreds of megabytes.
MAX_PAGE_BYTES = 1_048_576


def etag_of(row: Any) -> str:
    """A strong ETag: the representation changes exactly when `updated_at` does."""
    return f'"{(row.updated_at - _EPOCH) // _MICROSECOND:x}"'


def public_view(public: type[SQLModel], row: Any) -> SQLModel:
    """`public.model_validate(row)` straight through pydantic's validator: SQLModel's
    wrapper around it (built for table models) cost three times the validation."""
    return public.__pydantic_validator__.validate_python(row, from_attributes=True)


def json_response(
    body: SQLModel, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        body.model_dump_json(), status_code=status, headers=headers, media_type="application/json"
    )


def resource_response(
    public: type[SQLModel], row: Any, *, status: int = 200, location: str | None = None
) -> Response:
    """One resource, with its ETag (and Location when it was just created)."""
    headers = {"ETag": etag_of(row)}
    if location is not None:
        headers["Location"] = location
    return json_response(public_view(public, row), status=status, headers=headers)


def page_response(
    public: type[SQLModel], rows: Sequence[Any], *, page: PageRequest, key: str
) -> Response:
    """`{"items": [...], "next_cursor": ...}` from the rows `keyset` fetched (one more
    than the page holds). Items stop at the page's limit, or earlier once the body
    would pass MAX_PAGE_BYTES (but never before the first): `next_cursor` then
    continues after the last item sent, so a walk still sees every row once."""
    items: list[bytes] = []
    size = 0
    for row in rows[: page.limit]:
        item = public_view(public, row).model_dump_json().encode()
        size += len(item) + 1
        if items and size > MAX_PAGE_BYTES:
            break
        items.append(item)
    next_cursor = cursor_after(rows[len(items) - 1], key=key) if len(rows) > len(items) else None
    body = b'{"items":[%s],"next_cursor":%s}' % (b",".join(items), json.dumps(next_cursor).encode())
    return Response(body, media_type="application/json")
