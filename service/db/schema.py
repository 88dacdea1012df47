"""`init_db`: brings any database to the latest Alembic revision, once, however
many processes start at the same time.

What it finds, and what it does:

- at the latest revision: nothing (one query, outside a transaction);
- no revision table and none of the service's tables: upgrades to the latest;
- no revision table but the service's tables (made by a release from before
  migrations, with `create_all`): compares them with the first revision; if
  they agree it stamps that revision and upgrades, otherwise it refuses with
  one line naming the differences (`SchemaMismatch`), never guessing;
- an older revision: upgrades;
- a revision this code does not know (newer code was rolled back): leaves the
  database alone, with a warning.

Everything after the first query runs in one transaction under a lock: a
PostgreSQL advisory lock, or SQLite's write lock (`BEGIN IMMEDIATE`, with
foreign keys off so that a batch migration, which copies and drops a table,
cannot cascade deletes). Whoever waited for the lock looks again, finds the
work done, and leaves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db.compare import schema_differences
from service.db.engine import autocommit

logger = logging.getLogger(__name__)

MIGRATIONS = "service.db:migrations"
BASELINE_REVISION = "0001"
# pg_advisory_xact_lock key that serialises migrations across workers and dynos.
INIT_DB_LOCK_KEY = 0x5E55_1017
MAX_NAMED_DIFFERENCES = 5


class SchemaMismatch(Exception):
    """The database's tables are not the first revision's; the message is the one
    line for the operator."""


def alembic_config(*, connection: Connection | None = None, migrations: str = MIGRATIONS) -> Config:
    """Alembic's configuration, built in code so the installed service needs no
    alembic.ini; env.py migrates over `connection` when one is given."""
    config = Config()
    config.set_main_option("script_location", migrations)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def scripts(migrations: str = MIGRATIONS) -> ScriptDirectory:
    """The revisions, read once per process."""
    return ScriptDirectory.from_config(alembic_config(migrations=migrations))


def baseline_metadata(migrations: str = MIGRATIONS) -> MetaData:
    """The first revision's tables, frozen in its own file."""
    metadata: MetaData = scripts(migrations).get_revision(BASELINE_REVISION).module.BASELINE
    return metadata


def next_revision_id(script: ScriptDirectory) -> str:
    """Revisions are numbered in order: 0001, 0002, ..."""
    numbers = [int(rev.revision) for rev in script.walk_revisions() if rev.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


async def init_db(engine: AsyncEngine, *, migrations: str = MIGRATIONS) -> None:
    """Bring the database to the latest revision (see the module docstring).
    Idempotent, and safe when several processes run it at once."""
    current = await _recorded_revisions(engine)
    if current == set(scripts(migrations).get_heads()):
        return
    if current and _unknown(current, migrations):
        return
    async with migration_connection(engine) as connection:
        await connection.run_sync(_bring_to_head, migrations)


async def _recorded_revisions(engine: AsyncEngine) -> set[str] | None:
    """The revisions the database records, in one round trip outside a transaction;
    None when there is no revision table, or no answer (the locked path will tell)."""
    try:
        async with autocommit(engine).connect() as connection:
            result = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return {row[0] for row in result}
    except DBAPIError:
        return None


def _unknown(current: set[str], migrations: str) -> bool:
    """Whether the database is at a revision this code lacks; leave such a database
    alone: guessing could undo what newer code did (a rollback of the code)."""
    unknown = current - {rev.revision for rev in scripts(migrations).walk_revisions()}
    if unknown:
        logger.warning(
            "the database is at revision %s, which this release does not know "
            "(was newer code rolled back?); leaving the schema as it is",
            ", ".join(sorted(unknown)),
        )
    return bool(unknown)


def _bring_to_head(connection: Connection, migrations: str) -> None:
    """Under the lock: look again (another process may have finished), then adopt,
    upgrade, or leave alone."""
    config = alembic_config(connection=connection, migrations=migrations)
    current = set(MigrationContext.configure(connection).get_current_heads())
    heads = set(scripts(migrations).get_heads())
    if current == heads or (current and _unknown(current, migrations)):
        return
    if not current and _has_baseline_tables(connection, migrations):
        _check_adoptable(connection, migrations)
        command.stamp(config, BASELINE_REVISION)
        logger.info("adopted a database made before migrations: stamped %s", BASELINE_REVISION)
        current = {BASELINE_REVISION}
    command.upgrade(config, "heads")
    logger.info(
        "migrated the database from %s to %s",
        ", ".join(sorted(current)) or "empty",
        ", ".join(sorted(heads)),
    )


def _has_baseline_tables(connection: Connection, migrations: str) -> bool:
    existing = set(inspect(connection).get_table_names())
    return bool(existing & set(baseline_metadata(migrations).tables))


def _check_adoptable(connection: Connection, migrations: str) -> None:
    differences = schema_differences(
        connection, baseline_metadata(migrations), ignore_other_tables=True
    )
    if differences:
        named = "; ".join(differences[:MAX_NAMED_DIFFERENCES])
        more = len(differences) - MAX_NAMED_DIFFERENCES
        raise SchemaMismatch(
            f"the database has the service's tables but no revision table, and they "
            f"differ from revision {BASELINE_REVISION}: {named}"
            f"{f' (and {more} more)' if more > 0 else ''}; "
            "not migrating it: fix the schema by hand, then stamp it with "
            f"`alembic stamp {BASELINE_REVISION}`"
        )


@asynccontextmanager
async def migration_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction that no other migration can run beside, committed
    when the block ends without an error. env.py uses it too (`alembic upgrade`)."""
    if engine.dialect.name != "sqlite":
        async with engine.begin() as connection:
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": INIT_DB_LOCK_KEY}
            )
            yield connection
        return
    async with engine.connect() as connection:
        # Only outside a transaction does SQLite take this pragma; a batch migration
        # drops and recreates tables, which with foreign keys on would cascade.
        await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        await connection.commit()
        try:
            # SQLite's own database-wide write lock: other processes wait for it
            # (busy timeout, then a transient error that startup retries).
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection
            violations = await connection.exec_driver_sql("PRAGMA foreign_key_check")
            if violations.first() is not None:
                raise RuntimeError("the migration left rows whose foreign keys point nowhere")
            await connection.commit()
        finally:
            await connection.rollback()
            await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            await connection.commit()
