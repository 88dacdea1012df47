"""A conversation's messages, and /messages/{uid} itself."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud, idempotency
from service.errors import found
from service.inputs import read_body
from service.models import Message, MessageCreate, MessagePage, MessagePublic, MessageUpdate
from service.openapi import operation
from service.pagination import PageRequest
from service.representations import page_response, resource_response
from service.routes.resources import delete_handler, read_handler, update_handler
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
    response = resource_response(
        MessagePublic, message, status=201, location=f"/messages/{message.uid}"
    )
    await idempotency.save(request, response)
    await session.commit()
    return response


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
    return page_response(MessagePublic, rows, page=page, key="created_at")


read_message = read_handler(Message, MessagePublic, what="message")
update_message = update_handler(
    Message,
    MessagePublic,
    body=MessageUpdate,
    apply=crud.update_message,
    what="message",
    summary="Edit a message's prompt or response",
)
delete_message = delete_handler(Message, what="message", summary="Delete a message")

ROUTES = [
    MethodRoute("/conversations/{uid:uuid}/messages", GET=list_messages, POST=create_message),
    MethodRoute(
        "/messages/{uid:uuid}", GET=read_message, PATCH=update_message, DELETE=delete_message
    ),
]
