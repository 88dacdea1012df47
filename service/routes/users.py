"""/users: create, list, read, update and delete users."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from service import crud
from service.errors import found
from service.inputs import check_if_match, read_body
from service.models import UserCreate, UserPage, UserPublic, UserUpdate
from service.openapi import operation
from service.pagination import PageRequest, split_page
from service.representations import etag_of, page_response, resource_response
from service.routing import MethodRoute


@operation("List users, oldest first", response=UserPage, paginated=True)
async def list_users(request: Request) -> Response:
    """One page of users; follow `next_cursor` for the next."""
    page = PageRequest.from_request(request)
    rows = await crud.list_users(request.state.db, page=page)
    items, next_cursor = split_page(rows, page=page, key="created_at")
    return page_response(UserPage, items, next_cursor)


@operation("Create a user", body=UserCreate, response=UserPublic, status=201, errors=(409,))
async def create_user(request: Request) -> Response:
    """Create a user; 409 if the email is taken (case-insensitively)."""
    data = await read_body(request, UserCreate)
    session: AsyncSession = request.state.db
    user = await crud.create_user(session, data=data)
    await session.commit()
    return resource_response(UserPublic, user, status=201, location=f"/users/{user.uid}")


@operation("Read a user", response=UserPublic)
async def read_user(request: Request) -> Response:
    """One user, with its ETag."""
    user = found(await crud.get_user(request.state.db, uid=request.path_params["uid"]), "user")
    return resource_response(UserPublic, user)


@operation(
    "Update some of a user's fields", body=UserUpdate, response=UserPublic, errors=(409, 412)
)
async def update_user(request: Request) -> Response:
    """Partial update, honouring If-Match."""
    data = await read_body(request, UserUpdate)
    session: AsyncSession = request.state.db
    user = found(
        await crud.get_user(session, uid=request.path_params["uid"], for_update=True), "user"
    )
    check_if_match(request, etag_of(user))
    await crud.update_user(session, user=user, data=data)
    await session.commit()
    return resource_response(UserPublic, user)


@operation(
    "Delete a user with its conversations and messages", response=None, status=204, errors=(412,)
)
async def delete_user(request: Request) -> Response:
    """Delete, honouring If-Match; conversations and messages go with it."""
    session: AsyncSession = request.state.db
    user = found(
        await crud.get_user(session, uid=request.path_params["uid"], for_update=True), "user"
    )
    check_if_match(request, etag_of(user))
    await crud.delete_row(session, row=user)
    await session.commit()
    return Response(status_code=204)


ROUTES = [
    MethodRoute("/users", GET=list_users, POST=create_user),
    MethodRoute("/users/{uid:uuid}", GET=read_user, PATCH=update_user, DELETE=delete_user),
]
