"""A user's conversations, and /conversations/{uid} itself."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud, idempotency
from service.errors import found
from service.inputs import read_body
from service.models import (
    Conversation,
    ConversationCreate,
    ConversationPage,
    ConversationPublic,
    ConversationUpdate,
)
from service.openapi import operation
from service.pagination import PageRequest
from service.representations import page_response, resource_response
from service.routes.resources import delete_handler, read_handler, update_handler
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
    response = resource_response(
        ConversationPublic, conversation, status=201, location=f"/conversations/{conversation.uid}"
    )
    await idempotency.save(request, response)
    await session.commit()
    return response


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
    return page_response(ConversationPublic, rows, page=page, key="updated_at")


read_conversation = read_handler(Conversation, ConversationPublic, what="conversation")
update_conversation = update_handler(
    Conversation,
    ConversationPublic,
    body=ConversationUpdate,
    apply=crud.update_conversation,
    what="conversation",
    summary="Rename a conversation",
)
delete_conversation = delete_handler(
    Conversation, what="conversation", summary="Delete a conversation with its messages"
)

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
