"""The data: users, their conversations and the messages in them.

Each entity is a family: a base with the fields clients write, a create model
and an update model (what a request body may hold: strict types, unknown and
server-set fields rejected), the table model, a public model for responses and
a page model for lists. Validation lives in the field types, so the OpenAPI
document shows exactly what is enforced.
"""

from __future__ import annotations

import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, StringConstraints, model_validator
from sqlalchemy import Column, ForeignKey, Index, Integer, LargeBinary, String, Text, func
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel

from service.emails import EmailAddress

MAX_MESSAGE_CHARS = 100_000


def storable_text(value: str) -> str:
    """Reject NUL, which PostgreSQL cannot store, so every backend answers alike (422).

    Unpaired surrogates, the other text it cannot store, pydantic already rejects.
    """
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def email_key(email: str) -> str:
    """What makes two emails one user, computed here because databases disagree
    (SQLite's lower() folds only ASCII; PostgreSQL's follows the locale).

    The local part is compared as Unicode compatibility-caseless text (full case
    folding and NFKC: `ÉMILE` is `émile`, `STRASSE` is `straße`, fullwidth letters
    and ligatures such as `ﬁ` are plain letters), so look-alike addresses cannot
    make a second account. The domain is compared as IDNA normalised it (lower case),
    not folded: `faß.de` and `fass.de` are two domains.
    """
    local, _, domain = email.rpartition("@")
    # Unicode's compatibility caseless match (D146), kept in composed form.
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFD", local).casefold())
    return f"{unicodedata.normalize('NFKC', folded.casefold())}@{domain.lower()}"


def _bounded(min_length: int, max_length: int) -> Any:
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length),
        AfterValidator(storable_text),
    ]


Username = _bounded(1, 64)
PersonName = _bounded(1, 100)
Title = _bounded(1, 200)
Email = Annotated[EmailAddress, StringConstraints(max_length=254)]
MessageText = _bounded(0, MAX_MESSAGE_CHARS)
Role = Literal["user", "admin"]

_BODY_CONFIG = ConfigDict(extra="forbid", strict=True)


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that reads back in UTC on every backend.

    SQLite keeps no zone, so values come back naive there; they were written in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _timestamp(*, nullable: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable))


def _version_column() -> Column[datetime]:
    return Column("updated_at", UTCDateTime(), nullable=False)


def _versioned_by(column: Column[datetime]) -> dict[str, Any]:
    """Every ORM UPDATE or DELETE of a row checks `updated_at` is still what was read
    (StaleDataError otherwise); the service sets the new value itself."""
    return {"version_id_col": column, "version_id_generator": False}


_USER_VERSION = _version_column()
_CONVERSATION_VERSION = _version_column()
_MESSAGE_VERSION = _version_column()


# -- users -------------------------------------------------------------------


class UserBase(SQLModel):
    username: Username = Field(max_length=64)
    email: Email = Field(max_length=254)
    first_name: PersonName = Field(max_length=100)
    last_name: PersonName = Field(max_length=100)
    role: Role = Field(default="user", sa_type=String(16))
    is_verified: bool = False


class UserCreate(UserBase):
    model_config = _BODY_CONFIG


class UserUpdate(SQLModel):
    """Partial update: absent fields stay as they are; null is not a value here."""

    model_config = _BODY_CONFIG

    username: Username = None
    email: Email = None
    first_name: PersonName = None
    last_name: PersonName = None
    role: Role = None
    is_verified: bool = None


class User(UserBase, table=True):
    __mapper_args__ = _versioned_by(_USER_VERSION)
    __tablename__ = "users"
    __table_args__ = (
        # Kept while a release that relies on it may still run (see README).
        Index("uq_users_email_lower", func.lower(Column("email")), unique=True),
        Index("uq_users_email_key", "email_key", unique=True),
        Index("ix_users_created_at_uid", "created_at", "uid"),
    )

    uid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    verified_at: datetime | None = _timestamp(nullable=True)
    created_at: datetime = _timestamp()
    updated_at: datetime = Field(sa_column=_USER_VERSION)
    # email_key(email), written by crud with every email. Unbounded: NFKC can
    # lengthen text 11-fold in bytes, though 254 bytes of email stay under 2.2 KB,
    # inside PostgreSQL's index entry limit. Nullable until no running release
    # writes users without it (README, "Changing a schema under a running service").
    email_key: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class UserPublic(SQLModel):
    """What clients read. Plain types: rows were validated on the way in, and
    checking every email again on the way out is most of a list's cost."""

    uid: uuid.UUID
    username: str
    email: str
    first_name: str
    last_name: str
    role: Role
    is_verified: bool
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime


class UserPage(SQLModel):
    items: list[UserPublic]
    next_cursor: str | None


# -- conversations -------------------------------------------------------------


class ConversationBase(SQLModel):
    title: Title = Field(max_length=200)


class ConversationCreate(ConversationBase):
    model_config = _BODY_CONFIG


class ConversationUpdate(SQLModel):
    model_config = _BODY_CONFIG

    title: Title = None


class Conversation(ConversationBase, table=True):
    __mapper_args__ = _versioned_by(_CONVERSATION_VERSION)
    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_user_updated", "user_uid", "updated_at", "uid"),)

    uid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_uid: uuid.UUID = Field(
        sa_column=Column(ForeignKey("users.uid", ondelete="CASCADE"), nullable=False)
    )
    created_at: datetime = _timestamp()
    updated_at: datetime = Field(sa_column=_CONVERSATION_VERSION)


class ConversationPublic(SQLModel):
    uid: uuid.UUID
    user_uid: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime


class ConversationPage(SQLModel):
    items: list[ConversationPublic]
    next_cursor: str | None


# -- messages ------------------------------------------------------------------


class MessageBase(SQLModel):
    prompt: MessageText | None = Field(default=None, sa_column=Column(Text, nullable=True))
    response: MessageText | None = Field(default=None, sa_column=Column(Text, nullable=True))


def _require_some_text(message: MessageBase) -> None:
    if message.prompt is None and message.response is None:
        raise ValueError("prompt and response cannot both be null")


class MessageCreate(MessageBase):
    model_config = _BODY_CONFIG

    @model_validator(mode="after")
    def _has_text(self) -> MessageCreate:
        _require_some_text(self)
        return self


class MessageUpdate(SQLModel):
    """Partial update; the merged message must still have a prompt or a response."""

    model_config = _BODY_CONFIG

    prompt: MessageText | None = None
    response: MessageText | None = None


class Message(MessageBase, table=True):
    __mapper_args__ = _versioned_by(_MESSAGE_VERSION)
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_created", "conversation_uid", "created_at", "uid"),
    )

    uid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    conversation_uid: uuid.UUID = Field(
        sa_column=Column(ForeignKey("conversations.uid", ondelete="CASCADE"), nullable=False)
    )
    user_uid: uuid.UUID = Field(
        sa_column=Column(ForeignKey("users.uid", ondelete="CASCADE"), nullable=False, index=True)
    )
    created_at: datetime = _timestamp()
    updated_at: datetime = Field(sa_column=_MESSAGE_VERSION)


class MessagePublic(SQLModel):
    uid: uuid.UUID
    conversation_uid: uuid.UUID
    user_uid: uuid.UUID
    prompt: str | None
    response: str | None
    created_at: datetime
    updated_at: datetime


class MessagePage(SQLModel):
    items: list[MessagePublic]
    next_cursor: str | None


# -- idempotency keys ------------------------------------------------------------


class IdempotencyKey(SQLModel, table=True):
    """A POST's Idempotency-Key and the response to replay (service.idempotency).

    `scope` is a hash of the caller's bearer key, never the key itself. The
    response columns are null only inside the transaction that claimed the key:
    they are written in that same transaction, just before its commit.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    scope: str = Field(sa_column=Column(String(64), primary_key=True))
    key: str = Field(sa_column=Column(String(255), primary_key=True))
    fingerprint: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _timestamp()
    status: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    location: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    etag: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    body: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
