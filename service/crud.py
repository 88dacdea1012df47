"""Storing and loading users, conversations and messages.

Functions are keyword-only, take the request's session, and return the row or
None (the handler turns None into 404). They flush but never commit: the
handler commits before it builds its response.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import update
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from service.errors import ValidationFailed
from service.models import (
    Conversation,
    ConversationCreate,
    ConversationUpdate,
    Message,
    MessageCreate,
    MessageUpdate,
    User,
    UserCreate,
    UserUpdate,
    utc_now,
)
from service.pagination import PageRequest, keyset

Row = User | Conversation | Message


async def delete_row(session: AsyncSession, *, row: Row) -> None:
    """Delete a loaded row; the database's ON DELETE CASCADE removes its children."""
    await session.delete(row)
    await session.flush()


# -- users -------------------------------------------------------------------


async def create_user(session: AsyncSession, *, data: UserCreate) -> User:
    now = utc_now()
    user = User(
        **data.model_dump(),
        verified_at=now if data.is_verified else None,
        created_at=now,
        updated_at=now,
    )
    session.add(user)
    await session.flush()
    return user


async def get_user(
    session: AsyncSession, *, uid: uuid.UUID, for_update: bool = False
) -> User | None:
    return await session.get(User, uid, with_for_update=for_update)


async def list_users(session: AsyncSession, *, page: PageRequest) -> Sequence[User]:
    statement = keyset(select(User), at=User.created_at, uid=User.uid, page=page)
    return (await session.exec(statement)).all()


async def update_user(session: AsyncSession, *, user: User, data: UserUpdate) -> User:
    changes = data.model_dump(exclude_unset=True)
    now = utc_now()
    if changes.get("is_verified", user.is_verified) != user.is_verified:
        user.verified_at = now if changes["is_verified"] else None
    user.sqlmodel_update(changes)
    user.updated_at = now
    await session.flush()
    return user


# -- conversations -------------------------------------------------------------


async def create_conversation(
    session: AsyncSession, *, user_uid: uuid.UUID, data: ConversationCreate
) -> Conversation | None:
    if await session.get(User, user_uid) is None:
        return None
    now = utc_now()
    conversation = Conversation(
        **data.model_dump(), user_uid=user_uid, created_at=now, updated_at=now
    )
    session.add(conversation)
    await session.flush()
    return conversation


async def get_conversation(
    session: AsyncSession, *, uid: uuid.UUID, for_update: bool = False
) -> Conversation | None:
    return await session.get(Conversation, uid, with_for_update=for_update)


async def list_conversations(
    session: AsyncSession, *, user_uid: uuid.UUID, page: PageRequest
) -> Sequence[Conversation] | None:
    """A user's conversations, most recently updated first; None if the user does not exist."""
    if await session.get(User, user_uid) is None:
        return None
    statement = keyset(
        select(Conversation).where(Conversation.user_uid == user_uid),
        at=Conversation.updated_at,
        uid=Conversation.uid,
        page=page,
        newest_first=True,
    )
    return (await session.exec(statement)).all()


async def update_conversation(
    session: AsyncSession, *, conversation: Conversation, data: ConversationUpdate
) -> Conversation:
    conversation.sqlmodel_update(data.model_dump(exclude_unset=True))
    conversation.updated_at = utc_now()
    await session.flush()
    return conversation


# -- messages ------------------------------------------------------------------


async def create_message(
    session: AsyncSession, *, conversation_uid: uuid.UUID, data: MessageCreate
) -> Message | None:
    """Add a message and bump its conversation's updated_at in the same transaction."""
    now = utc_now()
    bumped = await session.exec(
        update(Conversation)
        .where(Conversation.uid == conversation_uid)
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


async def get_message(
    session: AsyncSession, *, uid: uuid.UUID, for_update: bool = False
) -> Message | None:
    return await session.get(Message, uid, with_for_update=for_update)


async def list_messages(
    session: AsyncSession, *, conversation_uid: uuid.UUID, page: PageRequest
) -> Sequence[Message] | None:
    """A conversation's messages, oldest first; None if the conversation does not exist."""
    if await session.get(Conversation, conversation_uid) is None:
        return None
    statement = keyset(
        select(Message).where(Message.conversation_uid == conversation_uid),
        at=Message.created_at,
        uid=Message.uid,
        page=page,
    )
    return (await session.exec(statement)).all()


async def update_message(
    session: AsyncSession, *, message: Message, data: MessageUpdate
) -> Message:
    """Apply a partial update; the result must still have a prompt or a response."""
    changes = data.model_dump(exclude_unset=True)
    if changes.get("prompt", message.prompt) is None and (
        changes.get("response", message.response) is None
    ):
        raise ValidationFailed.single(["body"], "prompt and response cannot both be null")
    message.sqlmodel_update(changes)
    message.updated_at = utc_now()
    await session.flush()
    return message
