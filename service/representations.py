"""Turning stored rows into JSON responses: public models, pages, ETags."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import SQLModel
from starlette.responses import Response

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def etag_of(row: Any) -> str:
    """A strong ETag: the representation changes exactly when `updated_at` does."""
    return f'"{(row.updated_at - _EPOCH) // _MICROSECOND:x}"'


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
    return json_response(public.model_validate(row), status=status, headers=headers)


def page_response(page: type[SQLModel], rows: Sequence[Any], next_cursor: str | None) -> Response:
    return json_response(page.model_validate({"items": rows, "next_cursor": next_cursor}))
