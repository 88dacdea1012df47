"""Storing and loading users, conversations and messages.

Functions take the request's session and return the row or None (the
handler turns None into 404). Reads return plain rows; writes work on ORM
objects, whose `updated_at` version column guards against lost updates. They
flush but never commit: the handler commits before it builds its response.
The update functions share one positional shape, so one generic handler
(service.routes.resources) serves every entity.
"""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

from sqlalchemy import Column, Select, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from service.db import core
from service.db.core import RowData
from service.errors import ValidationFailed, is_foreign_key_violation
from service.models import (
    Conversation,
    ConversationCreate,
    ConversationPublic,
    ConversationUpdate,
    Message,
    MessageCreate,
    MessagePublic,
    MessageUpdate,
    User,
    UserCreate,
    UserPublic,
    UserUpdate,
    email_key,
    utc_now,
)
from service.pagination import PageRequest, keyset

Entity = User | Conversation | Message
# A read returns the columns of its entity's public view, in the view's field
# order: service.representations writes such a row without building the view.
_SHOWN: dict[type[Entity], type[SQLModel]] = {
    User: UserPublic,
    Conversation: ConversationPublic,
    Message: MessagePublic,
}


def _shown_columns(model: type[Entity]) -> list[Column[Any]]:
    table = model.__table__
    return [table.c[name] for name in _SHOWN[model].model_fields]


@cache
def _by_uid(model: type[Entity], *, whole: bool) -> Select[Any]:
    """`SELECT <shown columns or uid> FROM <table> WHERE uid = :uid`, built once per table."""
    table = model.__table__
    columns = _shown_columns(model) if whole else [table.c.uid]
    return select(*columns).where(table.c.uid == bindparam("uid"))


async def read_row(session: AsyncSession, *, model: type[Entity], uid: uuid.UUID) -> RowData | None:
    """A resource as a plain row, for a response: reads skip the ORM's identity map,
    object loading and execution layer, which cost more than the query itself."""
    rows = await core.fetch(session, _by_uid(model, whole=True), {"uid": uid})
    return rows[0] if rows else None


async def exists(session: AsyncSession, *, model: type[Entity], uid: uuid.UUID) -> bool:
    return bool(await core.fetch(session, _by_uid(model, whole=False), {"uid": uid}))


@cache
def _page_of(
    model: type[Entity], *, parent: str | None, at: str, newest_first: bool, after: bool
) -> Select[Any]:
    """One page of `model`'s rows (of one parent, if `parent` names its column),
    ordered by (`at`, uid): built once per shape."""
    table = model.__table__
    statement = select(*_shown_columns(model))
    if parent is not None:
        statement = statement.where(table.c[parent] == bindparam("parent"))
    return keyset(
        statement, at=table.c[at], uid=table.c.uid, after=after, newest_first=newest_first
    )


async def _page(
    session: AsyncSession,
    model: type[Entity],
    page: PageRequest,
    *,
    at: str,
    newest_first: bool = False,
    parent: tuple[str, uuid.UUID] | None = None,
) -> list[RowData]:
    """A page of `model`'s rows, as `_page_of` orders them; `parent` is (column, uid)."""
    params = page.params()
    if parent is not None:
        params["parent"] = parent[1]
    query = _page_of(
        model,
        parent=parent[0] if parent else None,
        at=at,
        newest_first=newest_first,
        after=page.after is not None,
    )
    return await core.fetch(session, query, params)


async def _unless_missing(
    session: AsyncSession, rows: list[RowData], *, parent: type[Entity], uid: uuid.UUID
) -> list[RowData] | None:
    """A page of children, or None when their parent does not exist. Rows prove
    the parent exists, so only an empty page costs the round trip to ask."""
    if rows or await exists(session, model=parent, uid=uid):
        return rows
    return None


async def lock_row(
    session: AsyncSession, *, model: type[Entity], uid: uuid.UUID, deleting: bool = False
) -> Entity | None:
    """The ORM object, locked until commit, so a PATCH or DELETE checks If-Match
    against the very version it then changes.

    A PATCH never changes a key, so it takes FOR NO KEY UPDATE, which lets
    children be added meanwhile (their foreign key takes FOR KEY SHARE); only a
    DELETE needs FOR UPDATE.
    """
    return await session.get(model, uid, with_for_update={"key_share": not deleting})


async def delete_row(session: AsyncSession, row: Entity) -> None:
    """Delete a locked row; the database's ON DELETE CASCADE removes its children."""
    await session.delete(row)
    await session.flush()


# -- users -------------------------------------------------------------------


async def create_user(session: AsyncSession, *, data: UserCreate) -> RowData:
    """The new user as a read's row (its public columns, in order). One INSERT of
    values made here: the body is already validated, and they are exactly what the
    row holds, so there is nothing to read back (no RETURNING) and no ORM object."""
    now = utc_now()
    values = {
        **vars(data),  # model_dump() of a flat body, without SQLModel's wrapper around it
        "uid": uuid.uuid4(),
        "email_key": email_key(data.email),
        "verified_at": now if data.is_verified else None,
        "created_at": now,
        "updated_at": now,
    }
    await core.insert_row(session, User.__table__, values)
    return {name: values[name] for name in UserPublic.model_fields}


async def list_users(session: AsyncSession, *, page: PageRequest) -> list[RowData]:
    return await _page(session, User, page, at="created_at")


async def update_user(session: AsyncSession, user: User, data: UserUpdate) -> None:
    changes = data.model_dump(exclude_unset=True)
    now = utc_now()
    if changes.get("is_verified", user.is_verified) != user.is_verified:
        user.verified_at = now if changes["is_verified"] else None
    if "email" in changes:
        changes["email_key"] = email_key(changes["email"])
    user.sqlmodel_update(changes)
    user.updated_at = now
    await session.flush()


# -- conversations -------------------------------------------------------------


async def create_conversation(
    session: AsyncSession, *, user_uid: uuid.UUID, data: ConversationCreate
) -> Conversation | None:
    """None if the user does not exist: the foreign key says so, with no extra
    round trip to ask first."""
    now = utc_now()
    conversation = Conversation(
        **data.model_dump(), user_uid=user_uid, created_at=now, updated_at=now
    )
    session.add(conversation)
    try:
        await session.flush()
    except IntegrityError as exc:
        if is_foreign_key_violation(exc):
            return None
        raise
    return conversation


async def list_conversations(
    session: AsyncSession, *, user_uid: uuid.UUID, page: PageRequest
) -> list[RowData] | None:
    """A user's conversations, most recently updated first; None if the user does not exist."""
    rows = await _page(
        session,
        Conversation,
        page,
        at="updated_at",
        newest_first=True,
        parent=("user_uid", user_uid),
    )
    return await _unless_missing(session, rows, parent=User, uid=user_uid)


async def update_conversation(
    session: AsyncSession, conversation: Conversation, data: ConversationUpdate
) -> None:
    conversation.sqlmodel_update(data.model_dump(exclude_unset=True))
    conversation.updated_at = utc_now()
    await session.flush()


# -- messages ------------------------------------------------------------------


async def create_message(
    session: AsyncSession, *, conversation_uid: uuid.UUID, data: MessageCreate
) -> Message | None:
    """Add a message and bump its conversation's updated_at in the same transaction.

    Locks are taken in the order a user's DELETE takes them, user before
    conversation, so the two cannot deadlock: the one statement first holds the
    owner FOR KEY SHARE (the lock the message's foreign key would take later
    anyway), then updates the conversation.
    """
    now = utc_now()
    owner_row = (
        select(User.uid)
        .join(Conversation, Conversation.user_uid == User.uid)
        .where(Conversation.uid == conversation_uid)
        .with_for_update(read=True, key_share=True, of=User)
        .cte("owner")
    )
    bumped = await session.exec(
        update(Conversation)
        .where(Conversation.uid == conversation_uid, Conversation.user_uid == owner_row.c.uid)
        .values(updated_at=now)
        .returning(Conversation.user_uid)
        .execution_options(synchronize_session=False)
    )
    owner = bumped.scalar_one_or_none()
    if owner is None:
        return None
    message = Message(
        **data.model_dump(),
        conversation_uid=conversation_uid,
        user_uid=owner,
        created_at=now,
        updated_at=now,
    )
    session.add(message)
    await session.flush()
    return message


async def list_messages(
    session: AsyncSession, *, conversation_uid: uuid.UUID, page: PageRequest
) -> list[RowData] | None:
    """A conversation's messages, oldest first; None if the conversation does not exist."""
    rows = await _page(
        session, Message, page, at="created_at", parent=("conversation_uid", conversation_uid)
    )
    return await _unless_missing(session, rows, parent=Conversation, uid=conversation_uid)


async def update_message(session: AsyncSession, message: Message, data: MessageUpdate) -> None:
    """Apply a partial update; the result must still have a prompt or a response."""
    changes = data.model_dump(exclude_unset=True)
    if changes.get("prompt", message.prompt) is None and (
        changes.get("response", message.response) is None
    ):
        raise ValidationFailed.single(["body"], "prompt and response cannot both be null")
    message.sqlmodel_update(changes)
    message.updated_at = utc_now()
    await session.flush()
