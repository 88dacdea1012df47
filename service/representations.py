"""Turning stored rows into JSON responses: public models, pages, ETags."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from pydantic import TypeAdapter
from sqlmodel import SQLModel
from starlette.responses import Response
from typing_extensions import TypedDict  # pydantic refuses typing's below Python 3.12

from service.pagination import PageRequest, cursor_after

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A page stops adding items past about this size: 200 messages of 100,000
# characters each would otherwise be a body of hundreds of megabytes.
MAX_PAGE_BYTES = 1_048_576


def etag_of(row: Any) -> str:
    """A strong ETag: the representation changes exactly when `updated_at` does."""
    return etag_at(row.updated_at)


def etag_at(updated_at: datetime) -> str:
    return f'"{(updated_at - _EPOCH) // _MICROSECOND:x}"'


def public_view(public: type[SQLModel], row: Any) -> SQLModel:
    """`public.model_validate(row)` straight through pydantic's validator: SQLModel's
    wrapper around it (built for table models) cost three times the validation."""
    return public.__pydantic_validator__.validate_python(row, from_attributes=True)


@cache
def _shown(public: type[SQLModel]) -> type:
    """`public`'s fields as a TypedDict, to write a read's row as `public` would
    without building the model (a fifth of the cost). The row is a dict of exactly
    `public`'s columns in its field order (crud selects them so): the output keeps
    the input's key order. The values are the database's, of the public types."""
    fields = {name: field.annotation for name, field in public.model_fields.items()}
    return TypedDict(public.__name__, fields)  # type: ignore[operator, no-any-return]


@cache
def _row_json(public: type[SQLModel]) -> TypeAdapter[Any]:
    return TypeAdapter(_shown(public))


@cache
def _rows_json(public: type[SQLModel]) -> TypeAdapter[Any]:
    """`_row_json` for a whole page in one call."""
    return TypeAdapter(list[_shown(public)])  # type: ignore[valid-type]


def json_response(
    body: bytes | str, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def resource_response(
    public: type[SQLModel], row: Any, *, status: int = 200, location: str | None = None
) -> Response:
    """One resource, with its ETag (and Location when it was just created). `row` is
    a read's dict (see `_row_json`) or anything `public` validates from attributes."""
    if isinstance(row, dict):
        body, etag = _row_json(public).dump_json(row), etag_at(row["updated_at"])
    else:
        view = public_view(public, row)
        body, etag = view.model_dump_json(), etag_of(view)
    headers = {"ETag": etag}
    if location is not None:
        headers["Location"] = location
    return json_response(body, status=status, headers=headers)


def page_response(
    public: type[SQLModel], rows: Sequence[dict[str, Any]], *, page: PageRequest, key: str
) -> Response:
    """`{"items": [...], "next_cursor": ...}` from the rows `keyset` fetched (one more
    than the page holds). Items stop at the page's limit, or earlier once the body
    would pass MAX_PAGE_BYTES (but never before the first): `next_cursor` then
    continues after the last item sent, so a walk still sees every row once."""
    shown = rows[: page.limit]
    items = _rows_json(public).dump_json(shown)
    if len(items) - 1 > MAX_PAGE_BYTES:  # each item and its comma, as counted below
        kept = _items_within_bound(public, shown)
        shown = shown[: len(kept)]
        items = b"[%s]" % b",".join(kept)
    next_cursor = cursor_after(shown[-1], key=key) if len(rows) > len(shown) else None
    body = b'{"items":%s,"next_cursor":%s}' % (items, json.dumps(next_cursor).encode())
    return Response(body, media_type="application/json")


def _items_within_bound(public: type[SQLModel], rows: Sequence[dict[str, Any]]) -> list[bytes]:
    """The items of the first rows that, with a comma each, fit in MAX_PAGE_BYTES
    (at least one)."""
    write = _row_json(public).dump_json
    items: list[bytes] = []
    size = 0
    for row in rows:
        item = write(row)
        size += len(item) + 1
        if items and size > MAX_PAGE_BYTES:
            break
        items.append(item)
    return items
