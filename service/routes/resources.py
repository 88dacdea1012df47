"""The handlers every resource shares: read, update and delete by uid.

Each entity module builds its own with these factories, so the rules (404,
If-Match, commit before responding) live in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud
from service.errors import found
from service.inputs import check_if_match, read_body
from service.openapi import operation
from service.representations import etag_of, resource_response
from service.routing import Handler

Apply = Callable[[AsyncSession, Any, Any], Awaitable[None]]


def read_handler(model: type[crud.Entity], public: type[BaseModel], *, what: str) -> Handler:
    @operation(f"Read a {what}", response=public)
    async def read(request: Request) -> Response:
        """One resource, with its ETag."""
        row = await crud.read_row(request.state.db, model=model, uid=request.path_params["uid"])
        return resource_response(public, found(row, what))

    read.__name__ = f"read_{what}"
    return read


def update_handler(
    model: type[crud.Entity],
    public: type[BaseModel],
    *,
    body: type[BaseModel],
    apply: Apply,
    what: str,
    summary: str,
) -> Handler:
    @operation(summary, body=body, response=public, errors=(409, 412))
    async def update(request: Request) -> Response:
        """Partial update, honouring If-Match; committed before the response is built."""
        data = await read_body(request, body)
        session: AsyncSession = request.state.db
        row = found(await crud.lock_row(session, model=model, uid=request.path_params["uid"]), what)
        check_if_match(request, etag_of(row))
        await apply(session, row, data)
        await session.commit()
        return resource_response(public, row)

    update.__name__ = f"update_{what}"
    return update


def delete_handler(model: type[crud.Entity], *, what: str, summary: str) -> Handler:
    @operation(summary, response=None, status=204, errors=(412,))
    async def delete(request: Request) -> Response:
        """Delete, honouring If-Match; children go with it (ON DELETE CASCADE)."""
        session: AsyncSession = request.state.db
        row = found(
            await crud.lock_row(
                session, model=model, uid=request.path_params["uid"], deleting=True
            ),
            what,
        )
        check_if_match(request, etag_of(row))
        await crud.delete_row(session, row)
        await session.commit()
        return Response(status_code=204)

    delete.__name__ = f"delete_{what}"
    return delete
