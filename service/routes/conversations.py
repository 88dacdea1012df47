"""A user's conversations, and /conversations/{uid} itself."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud
from service.errors import found
from service.inputs import check_if_match, read_body
from service.models import (
    ConversationCreate,
    ConversationPage,
    ConversationPublic,
    ConversationUpdate,
)
from service.openapi import operation
from service.pagination import PageRequest, split_page
from service.representations import etag_of, page_response, resource_response
from service.routing import MethodRoute


@operation(
    "Start a conversation for a user",
    body=ConversationCreate,
    response=ConversationPublic,
    status=201,
)
async def create_conversation(request: Request) -> Response:
    """Create a conversation owned by the user in the path."""
    data = await read_body(request, ConversationCreate)
    session: AsyncSession = request.state.db
    conversation = found(
        await crud.create_conversation(session, user_uid=request.path_params["uid"], data=data),
        "user",
    )
    await session.commit()
    return resource_response(
        ConversationPublic, conversation, status=201, location=f"/conversations/{conversation.uid}"
    )


@operation(
    "List a user's conversations, most recently updated first",
    response=ConversationPage,
    paginated=True,
)
async def list_conversations(request: Request) -> Response:
    """One page of a user's conversations."""
    page = PageRequest.from_request(request)
    rows = found(
        await crud.list_conversations(
            request.state.db, user_uid=request.path_params["uid"], page=page
        ),
        "user",
    )
    items, next_cursor = split_page(rows, page=page, key="updated_at")
    return page_response(ConversationPage, items, next_cursor)


@operation("Read a conversation", response=ConversationPublic)
async def read_conversation(request: Request) -> Response:
    """One conversation, with its ETag."""
    conversation = found(
        await crud.get_conversation(request.state.db, uid=request.path_params["uid"]),
        "conversation",
    )
    return resource_response(ConversationPublic, conversation)


@operation(
    "Rename a conversation", body=ConversationUpdate, response=ConversationPublic, errors=(409, 412)
)
async def update_conversation(request: Request) -> Response:
    """Partial update, honouring If-Match."""
    data = await read_body(request, ConversationUpdate)
    session: AsyncSession = request.state.db
    conversation = found(
        await crud.get_conversation(session, uid=request.path_params["uid"], for_update=True),
        "conversation",
    )
    check_if_match(request, etag_of(conversation))
    await crud.update_conversation(session, conversation=conversation, data=data)
    await session.commit()
    return resource_response(ConversationPublic, conversation)


@operation("Delete a conversation with its messages", response=None, status=204, errors=(412,))
async def delete_conversation(request: Request) -> Response:
    """Delete, honouring If-Match; its messages go with it."""
    session: AsyncSession = request.state.db
    conversation = found(
        await crud.get_conversation(session, uid=request.path_params["uid"], for_update=True),
        "conversation",
    )
    check_if_match(request, etag_of(conversation))
    await crud.delete_row(session, row=conversation)
    await session.commit()
    return Response(status_code=204)


ROUTES = [
    MethodRoute(
        "/users/{uid:uuid}/conversations", GET=list_conversations, POST=create_conversation
    ),
    MethodRoute(
        "/conversations/{uid:uuid}",
        GET=read_conversation,
        PATCH=update_conversation,
        DELETE=delete_conversation,
    ),
]
