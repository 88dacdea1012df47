"""Baseline: the schema as `create_all` made it before migrations.

Revision ID: 0001
Revises:
Create Date: 2026-12-07

The tables are written out here, not imported from the models, so that later
model changes (which come with revisions of their own) never change what this
revision creates. `init_db` also compares a database made before migrations
with `BASELINE` before it stamps it as this revision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BASELINE = sa.MetaData()

sa.Table(
    "users",
    BASELINE,
    sa.Column("username", sa.String(length=64), nullable=False),
    sa.Column("email", sa.String(length=254), nullable=False),
    sa.Column("first_name", sa.String(length=100), nullable=False),
    sa.Column("last_name", sa.String(length=100), nullable=False),
    sa.Column("role", sa.String(length=16), nullable=False),
    sa.Column("is_verified", sa.Boolean(), nullable=False),
    sa.Column("uid", sa.Uuid(), nullable=False),
    sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("uid"),
    sa.Index("uq_users_email_lower", sa.text("lower(email)"), unique=True),
    sa.Index("ix_users_created_at_uid", "created_at", "uid"),
)

sa.Table(
    "conversations",
    BASELINE,
    sa.Column("title", sa.String(length=200), nullable=False),
    sa.Column("uid", sa.Uuid(), nullable=False),
    sa.Column("user_uid", sa.Uuid(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("uid"),
    sa.ForeignKeyConstraint(["user_uid"], ["users.uid"], ondelete="CASCADE"),
    sa.Index("ix_conversations_user_updated", "user_uid", "updated_at", "uid"),
)

sa.Table(
    "messages",
    BASELINE,
    sa.Column("prompt", sa.Text(), nullable=True),
    sa.Column("response", sa.Text(), nullable=True),
    sa.Column("uid", sa.Uuid(), nullable=False),
    sa.Column("conversation_uid", sa.Uuid(), nullable=False),
    sa.Column("user_uid", sa.Uuid(), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint("uid"),
    sa.ForeignKeyConstraint(["conversation_uid"], ["conversations.uid"], ondelete="CASCADE"),
    sa.ForeignKeyConstraint(["user_uid"], ["users.uid"], ondelete="CASCADE"),
    sa.Index("ix_messages_user_uid", "user_uid"),
    sa.Index("ix_messages_conversation_created", "conversation_uid", "created_at", "uid"),
)


def upgrade() -> None:
    # The same statements, in the same order, as create_all of these tables.
    for table in BASELINE.sorted_tables:
        op.execute(sa.schema.CreateTable(table))
        for index in sorted(table.indexes, key=lambda index: str(index.name)):
            op.execute(sa.schema.CreateIndex(index))


def downgrade() -> None:
    for table in reversed(BASELINE.sorted_tables):
        op.drop_table(table.name)
