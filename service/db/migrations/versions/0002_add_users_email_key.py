"""add users.email_key: emails unique after Unicode case folding

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

`lower(email)` folds only ASCII on SQLite and follows the locale on
PostgreSQL, so the service now computes each email's key itself and this
revision makes the key unique. Existing rows are backfilled here, in Python
(neither database can fold case the same way), with a copy of the rule frozen
as it is today. If two existing users' emails share a key, the revision
refuses, naming the users, and changes nothing.

`uq_users_email_lower` stays: the release before this one relies on it while it
still runs. Plain `op.add_column` and `op.create_index`, not batch mode: on
SQLite a batch would copy `users` and lose that expression index.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH_ROWS = 1000
MAX_NAMED_SETS = 5

USERS = sa.table(
    "users",
    sa.column("uid", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("email_key", sa.Text()),
)


class DuplicateEmails(Exception):
    """Existing users whose emails are one after folding; the message is the one
    line for the operator (user ids, never the emails: logs hold no personal data)."""


def email_key(email: str) -> str:
    """`service.models.email_key` as this revision was written: the local part
    NFKC-casefolded, the domain lower-cased. A later change of the rule comes with
    a revision of its own that recomputes every key."""
    local, _, domain = email.rpartition("@")
    # Unicode's compatibility caseless match (D146), kept in composed form.
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFD", local).casefold())
    return f"{unicodedata.normalize('NFKC', folded.casefold())}@{domain.lower()}"


def upgrade() -> None:
    if context.is_offline_mode():
        # A SQL script cannot run Python: fine for an empty database, and for a
        # populated one the old index still holds until a run online fills the keys.
        op.execute("-- 0002: users.email_key of existing rows is backfilled online only")
        keys: dict[uuid.UUID, str] = {}
    else:
        rows = op.get_bind().execute(sa.select(USERS.c.uid, USERS.c.email))
        keys = {row.uid: email_key(row.email) for row in rows}
        _refuse_duplicates(keys)
    op.add_column("users", sa.Column("email_key", sa.Text(), nullable=True))
    _backfill(keys)
    op.create_index("uq_users_email_key", "users", ["email_key"], unique=True)


def _refuse_duplicates(keys: dict[uuid.UUID, str]) -> None:
    """Before anything is written: which user keeps such an email is not ours to guess."""
    owners: defaultdict[str, list[str]] = defaultdict(list)
    for uid, key in keys.items():
        owners[key].append(str(uid))
    shared = sorted(sorted(uids) for uids in owners.values() if len(uids) > 1)
    if not shared:
        return
    named = "; ".join(", ".join(uids) for uids in shared[:MAX_NAMED_SETS])
    more = len(shared) - MAX_NAMED_SETS
    raise DuplicateEmails(
        f"revision 0002 makes emails unique ignoring case and Unicode compatibility "
        f"forms, and {len(shared)} set(s) of existing users share an email that way "
        f"(user uids: {named}{f'; and {more} more sets' if more > 0 else ''}); "
        "not migrating: change the email of all but one user in each set, then deploy again"
    )


def _backfill(keys: dict[uuid.UUID, str]) -> None:
    """Set every existing row's key, in batches; updated_at stays, since what a
    client reads (and its ETag) does not change."""
    fill = (
        USERS.update()
        .where(USERS.c.uid == sa.bindparam("row_uid"))
        .values(email_key=sa.bindparam("key"))
    )
    rows = [{"row_uid": uid, "key": key} for uid, key in keys.items()]
    for start in range(0, len(rows), BACKFILL_BATCH_ROWS):
        op.get_bind().execute(fill, rows[start : start + BACKFILL_BATCH_ROWS])


def downgrade() -> None:
    op.drop_index("uq_users_email_key", table_name="users")
    # Not batch mode, for the same reason as above (SQLite 3.35+ drops a column in place).
    op.drop_column("users", "email_key")
