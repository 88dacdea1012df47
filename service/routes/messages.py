"""A conversation's messages, and /messages/{uid} itself."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud
from service.errors import found
from service.inputs import check_if_match, read_body
from service.models import MessageCreate, MessagePage, MessagePublic, MessageUpdate
from service.openapi import operation
from service.pagination import PageRequest, split_page
from service.representations import etag_of, page_response, resource_response
from service.routing import MethodRoute


@operation(
    "Add a message to a conversation", body=MessageCreate, response=MessagePublic, status=201
)
async def create_message(request: Request) -> Response:
    """Add a message; the conversation's updated_at moves in the same transaction."""
    data = await read_body(request, MessageCreate)
    session: AsyncSession = request.state.db
    message = found(
        await crud.create_message(session, conversation_uid=request.path_params["uid"], data=data),
        "conversation",
    )
    await session.commit()
    return resource_response(
        MessagePublic, message, status=201, location=f"/messages/{message.uid}"
    )


@operation("List a conversation's messages, oldest first", response=MessagePage, paginated=True)
async def list_messages(request: Request) -> Response:
    """One page of a conversation's messages."""
    page = PageRequest.from_request(request)
    rows = found(
        await crud.list_messages(
            request.state.db, conversation_uid=request.path_params["uid"], page=page
        ),
        "conversation",
    )
    items, next_cursor = split_page(rows, page=page, key="created_at")
    return page_response(MessagePage, items, next_cursor)


@operation("Read a message", response=MessagePublic)
async def read_message(request: Request) -> Response:
    """One message, with its ETag."""
    message = found(
        await crud.get_message(request.state.db, uid=request.path_params["uid"]), "message"
    )
    return resource_response(MessagePublic, message)


@operation(
    "Edit a message's prompt or response",
    body=MessageUpdate,
    response=MessagePublic,
    errors=(409, 412),
)
async def update_message(request: Request) -> Response:
    """Partial update, honouring If-Match; a prompt or a response must remain."""
    data = await read_body(request, MessageUpdate)
    session: AsyncSession = request.state.db
    message = found(
        await crud.get_message(session, uid=request.path_params["uid"], for_update=True),
        "message",
    )
    check_if_match(request, etag_of(message))
    await crud.update_message(session, message=message, data=data)
    await session.commit()
    return resource_response(MessagePublic, message)


@operation("Delete a message", response=None, status=204, errors=(412,))
async def delete_message(request: Request) -> Response:
    """Delete, honouring If-Match."""
    session: AsyncSession = request.state.db
    message = found(
        await crud.get_message(session, uid=request.path_params["uid"], for_update=True),
        "message",
    )
    check_if_match(request, etag_of(message))
    await crud.delete_row(session, row=message)
    await session.commit()
    return Response(status_code=204)


ROUTES = [
    MethodRoute("/conversations/{uid:uuid}/messages", GET=list_messages, POST=create_message),
    MethodRoute(
        "/messages/{uid:uuid}", GET=read_message, PATCH=update_message, DELETE=delete_message
    ),
]
