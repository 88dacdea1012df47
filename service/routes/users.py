"""/users: create, list, read, update and delete users."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud, idempotency
from service.inputs import read_body
from service.models import User, UserCreate, UserPage, UserPublic, UserUpdate
from service.openapi import operation
from service.pagination import PageRequest
from service.representations import page_response, resource_response
from service.routes.resources import delete_handler, read_handler, update_handler
from service.routing import MethodRoute


@operation("List users, oldest first", response=UserPage, paginated=True)
async def list_users(request: Request) -> Response:
    """One page of users; follow `next_cursor` for the next."""
    page = PageRequest.from_request(request)
    rows = await crud.list_users(request.state.db, page=page)
    return page_response(UserPublic, rows, page=page, key="created_at")


@operation("Create a user", body=UserCreate, response=UserPublic, status=201, errors=(409,))
async def create_user(request: Request) -> Response:
    """Create a user; 409 if the email is taken (case-insensitively)."""
    data = await read_body(request, UserCreate)
    session: AsyncSession = request.state.db
    user = await crud.create_user(session, data=data)
    response = resource_response(UserPublic, user, status=201, location=f"/users/{user['uid']}")
    await idempotency.save(request, response)
    await session.commit()
    return response


read_user = read_handler(User, UserPublic, what="user")
update_user = update_handler(
    User,
    UserPublic,
    body=UserUpdate,
    apply=crud.update_user,
    what="user",
    summary="Update some of a user's fields",
)
delete_user = delete_handler(
    User, what="user", summary="Delete a user with its conversations and messages"
)

ROUTES = [
    MethodRoute("/users", GET=list_users, POST=create_user),
    MethodRoute("/users/{uid:uuid}", GET=read_user, PATCH=update_user, DELETE=delete_user),
]
