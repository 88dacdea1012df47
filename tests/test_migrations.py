"""Schema migrations (service/db/schema.py and service/db/migrations/): a fresh
database gets exactly the models' schema, a database made before migrations is
adopted with every row kept (or refused, naming what differs), the models and
the revisions never disagree, and any number of processes may migrate at once."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from alembic import command
from sqlalchemy import Column, Connection, MetaData, String, event, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel
from starlette.testclient import TestClient

from service.app import create_app
from service.db import SchemaMismatch, create_engine, init_db
from service.db.compare import schema_differences
from service.db.schema import (
    INIT_DB_LOCK_KEY,
    MIGRATIONS,
    alembic_config,
    baseline_metadata,
    migration_connection,
    next_revision_id,
    scripts,
)
from service.lifespan import start
from service.models import email_key
from tests.conftest import make_settings
from tests.factories import user_body
from tests.pgbouncer import running_pgbouncer
from tests.support import REPO, fresh_postgres_database, procfile_command, running_service

T = TypeVar("T")
HEAD = scripts().get_current_head()
MIGRATED = "migrated the database"
GENERATE = 'alembic revision --autogenerate -m "..."'


async def with_engine(database_url: str, use: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    engine = create_engine(make_settings(database_url))
    try:
        return await use(engine)
    finally:
        await engine.dispose()


def on(database_url: str, use: Callable[[Connection], T]) -> T:
    """Run `use` on a plain connection to the database, committing at the end."""

    async def go(engine: AsyncEngine) -> T:
        async with engine.begin() as connection:
            return await connection.run_sync(use)

    return asyncio.run(with_engine(database_url, go))


def migrate(database_url: str, *, migrations: str = MIGRATIONS) -> None:
    asyncio.run(with_engine(database_url, lambda engine: init_db(engine, migrations=migrations)))


def alembic(database_url: str, *args: str) -> None:
    """An Alembic command in-process, on the locked connection init_db uses."""

    async def go(engine: AsyncEngine) -> None:
        async with migration_connection(engine) as connection:
            await connection.run_sync(
                lambda sync: getattr(command, args[0])(alembic_config(connection=sync), *args[1:])
            )

    asyncio.run(with_engine(database_url, go))


def revisions(database_url: str) -> list[str]:
    def read(connection: Connection) -> list[str]:
        if not inspect(connection).has_table("alembic_version"):
            return []
        return [
            row[0] for row in connection.execute(text("SELECT version_num FROM alembic_version"))
        ]

    return on(database_url, read)


def table_names(database_url: str) -> set[str]:
    return on(database_url, lambda connection: set(inspect(connection).get_table_names()))


def drift(database_url: str, metadata: MetaData = SQLModel.metadata) -> list[str]:
    return on(database_url, lambda connection: schema_differences(connection, metadata))


# -- a database made before migrations, holding data --------------------------------


def make_pre_migration_database(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the release before migrations left: `create_all` of its tables (the
    baseline's), and 3 users with 2 conversations of 3 messages each."""
    baseline = baseline_metadata()
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def fill(connection: Connection) -> None:
        baseline.create_all(connection)
        users, conversations, messages = [], [], []
        for n in range(3):
            user = uuid.uuid4()
            users.append(
                {
                    "uid": user,
                    "username": f"user{n}",
                    "email": f"User{n}@Example.com",
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "role": "admin" if n == 0 else "user",
                    "is_verified": n == 1,
                    "verified_at": now if n == 1 else None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            for c in range(2):
                conversation = uuid.uuid4()
                conversations.append(
                    {
                        "uid": conversation,
                        "user_uid": user,
                        "title": f"talk {n}.{c}",
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                messages += [
                    {
                        "uid": uuid.uuid4(),
                        "conversation_uid": conversation,
                        "user_uid": user,
                        "prompt": f"question {m}",
                        "response": None if m == 2 else "answer \u00e9\U0001f600",
                        "created_at": now,
                        "updated_at": now,
                    }
                    for m in range(3)
                ]
        for name, rows in (
            ("users", users),
            ("conversations", conversations),
            ("messages", messages),
        ):
            connection.execute(baseline.tables[name].insert(), rows)

    on(database_url, fill)
    return rows_of(database_url)


def rows_of(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the baseline's tables, in a stable order."""
    baseline = baseline_metadata()

    def read(connection: Connection) -> dict[str, list[tuple[Any, ...]]]:
        return {
            name: sorted(
                tuple(row) for row in connection.execute(table.select().order_by(table.c.uid))
            )
            for name, table in baseline.tables.items()
        }

    return on(database_url, read)


def test_an_empty_database_is_migrated_to_head(database_url: str) -> None:
    migrate(database_url)

    assert revisions(database_url) == [HEAD]
    assert table_names(database_url) == {*SQLModel.metadata.tables, "alembic_version"}


def test_a_database_made_before_migrations_is_adopted_with_every_row(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = make_pre_migration_database(database_url)
    caplog.set_level(logging.INFO, logger="service.db.schema")

    migrate(database_url)

    assert revisions(database_url) == [HEAD]
    assert rows_of(database_url) == before
    assert sum(len(rows) for rows in before.values()) == 3 + 6 + 18
    assert "adopted a database made before migrations" in caplog.text
    assert drift(database_url) == []
    with TestClient(create_app(make_settings(database_url))) as client:
        users = client.get("/users").json()["items"]
        taken = client.post("/users", json=user_body(email="USER0@example.COM"))
    assert sorted(user["username"] for user in users) == ["user0", "user1", "user2"]
    assert taken.status_code == 409  # the adopted lower(email) index still holds


REBUILD_USERS = '''"""Test only: a batch migration, for which SQLite copies and drops `users`."""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down_revision}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.alter_column("username", existing_type=sa.String(64), type_=sa.String(80))
    # SQLite's copy of the table cannot carry expression indexes over: make it again.
    op.create_index(
        "uq_users_email_lower", "users", [sa.text("lower(email)")], unique=True, if_not_exists=True
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.alter_column("username", existing_type=sa.String(80), type_=sa.String(64))
'''


def migrations_with_table_rebuild(tmp_path: Path) -> str:
    """The service's migrations plus one more revision that rebuilds `users`."""
    copy = tmp_path / "migrations"
    source = Path(scripts().dir)
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    revision = next_revision_id(scripts())
    (copy / "versions" / f"{revision}_rebuild_users.py").write_text(
        REBUILD_USERS.format(revision=revision, down_revision=HEAD)
    )
    return str(copy)


def test_a_table_rebuild_keeps_the_rows_that_point_at_it(database_url: str, tmp_path: Path) -> None:
    """On SQLite a batch migration drops and recreates the table; with foreign keys on,
    that drop would cascade to every conversation and message."""
    before = make_pre_migration_database(database_url)
    migrations = migrations_with_table_rebuild(tmp_path)

    migrate(database_url, migrations=migrations)

    assert revisions(database_url) == [scripts(migrations).get_current_head()]
    assert rows_of(database_url) == before
    with TestClient(create_app(make_settings(database_url))) as client:
        first, second, _ = client.get("/users").json()["items"]
        deleted = client.delete(f"/users/{first['uid']}")
        taken = client.post("/users", json=user_body(email=second["email"].upper()))
    remaining = rows_of(database_url)
    assert deleted.status_code == 204
    assert taken.status_code == 409
    # The foreign keys still cascade after the rebuild: the user's 2 conversations
    # and 6 messages went with it.
    assert [len(remaining[name]) for name in ("users", "conversations", "messages")] == [2, 4, 12]


def drifted(connection: Connection) -> None:
    connection.execute(text("DROP INDEX uq_users_email_lower"))
    connection.execute(text("ALTER TABLE users ADD COLUMN nickname VARCHAR(40)"))


def test_a_pre_migration_database_that_differs_is_refused(database_url: str) -> None:
    make_pre_migration_database(database_url)
    on(database_url, drifted)

    with pytest.raises(SchemaMismatch) as refused:
        migrate(database_url)

    message = str(refused.value)
    assert "\n" not in message
    assert "differ from revision 0001" in message
    assert "add_index uq_users_email_lower on users" in message
    assert "remove_column users.nickname" in message
    assert "alembic stamp 0001" in message
    assert revisions(database_url) == []  # nothing stamped, nothing guessed


@pytest.mark.process
@pytest.mark.parametrize("process_type", ["release", "web"])
def test_the_refusal_ends_startup_with_one_line(
    database_url: str, tmp_path: Path, process_type: str
) -> None:
    """Whatever WEB_CONCURRENCY is: no worker starts on a schema it would refuse."""
    make_pre_migration_database(database_url)
    on(database_url, drifted)

    ended = run_procfile(process_type, database_url, tmp_path, WEB_CONCURRENCY="4")

    errors = [line for line in ended.stderr.splitlines() if " ERROR " in line]
    assert ended.returncode == 1
    assert len(errors) == 1, ended.stderr
    assert "differ from revision 0001: " in errors[0]
    assert "Traceback" not in ended.stderr
    assert "Application startup" not in ended.stderr


def test_at_head_init_db_is_one_query_and_no_ddl(database_url: str) -> None:
    migrate(database_url)
    statements: list[str] = []

    async def again(engine: AsyncEngine) -> None:
        event.listen(
            engine.sync_engine,
            "before_cursor_execute",
            lambda _conn, _cursor, statement, *_: statements.append(statement),
        )
        await init_db(engine)

    asyncio.run(with_engine(database_url, again))

    assert statements == ["SELECT version_num FROM alembic_version"]


def test_a_revision_this_code_does_not_know_is_left_alone(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Newer code migrated, then was rolled back: the old code must not touch it."""
    migrate(database_url)
    on(
        database_url,
        lambda connection: connection.execute(
            text("UPDATE alembic_version SET version_num = '9999'")
        ),
    )

    migrate(database_url)

    assert revisions(database_url) == ["9999"]
    assert "revision 9999, which this release does not know" in caplog.text


# -- 0002: users.email_key ----------------------------------------------------------------


def users_at_baseline(database_url: str, emails: list[str]) -> list[str]:
    """A database at revision 0001 holding one user per email; their uids, in order."""
    alembic(database_url, "upgrade", "0001")
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    rows = [
        {
            "uid": uuid.uuid4(),
            "username": f"user{n}",
            "email": email,
            "first_name": "Ada",
            "last_name": "Lovelace",
            "role": "user",
            "is_verified": False,
            "verified_at": None,
            "created_at": now,
            "updated_at": now,
        }
        for n, email in enumerate(emails)
    ]
    users = baseline_metadata().tables["users"]
    on(database_url, lambda connection: connection.execute(users.insert(), rows))
    return [str(row["uid"]) for row in rows]


def email_keys(database_url: str) -> dict[str, str]:
    return on(
        database_url,
        lambda connection: {
            email: key
            for email, key in connection.execute(text("SELECT email, email_key FROM users"))
        },
    )


def test_0002_backfills_every_users_email_key_and_keeps_the_rows(database_url: str) -> None:
    users_at_baseline(database_url, ["ÉMILE@x.org", "STRASSE@x.org", "Ada@example.com"])
    before = rows_of(database_url)

    migrate(database_url)

    assert revisions(database_url) == [HEAD]
    assert rows_of(database_url) == before  # updated_at (so every ETag) included
    keys = email_keys(database_url)
    assert keys == {email: email_key(email) for email in keys}  # the revision's rule is today's
    assert sorted(keys.values()) == ["ada@example.com", "strasse@x.org", "émile@x.org"]
    with TestClient(create_app(make_settings(database_url))) as client:
        taken = [
            client.post("/users", json=user_body(email=email)).status_code
            for email in ("émile@x.org", "straße@x.org")
        ]
    assert taken == [409, 409]


def test_0002_downgrades_with_every_row_and_the_old_index(database_url: str) -> None:
    users_at_baseline(database_url, ["ÉMILE@x.org", "STRASSE@x.org"])
    before = rows_of(database_url)
    migrate(database_url)

    alembic(database_url, "downgrade", "0001")

    assert rows_of(database_url) == before
    assert drift(database_url, baseline_metadata()) == []  # uq_users_email_lower still there


def test_0002_refuses_existing_users_whose_emails_fold_together(
    database_url: str, tmp_path: Path
) -> None:
    """Which of them keeps the email is not for a migration to guess: the release
    ends with one line naming the users (not their emails), and nothing changes."""
    # Pairs that lower(email) lets in on both backends (PostgreSQL folds É in UTF-8).
    uids = users_at_baseline(
        database_url,
        ["\uff21\uff24\uff21@x.org", "ada@x.org", "STRASSE@x.org", "straße@x.org", "émile@x.org"],
    )
    before = rows_of(database_url)

    ended = run_procfile("release", database_url, tmp_path)

    errors = [line for line in ended.stderr.splitlines() if " ERROR " in line]
    assert ended.returncode == 1
    assert len(errors) == 1, ended.stderr
    assert "2 set(s) of existing users share an email" in errors[0]
    assert all(uid in errors[0] for uid in uids[:4])
    assert uids[4] not in errors[0]
    assert "@x.org" not in ended.stderr
    assert "Traceback" not in ended.stderr
    assert revisions(database_url) == ["0001"]
    assert rows_of(database_url) == before
    assert drift(database_url, baseline_metadata()) == []  # no column, no index added


# -- models and migrations agree ------------------------------------------------------


def test_the_models_and_the_migrations_agree(database_url: str) -> None:
    """`alembic check`: autogenerate against the latest revision finds nothing to do."""
    migrate(database_url)

    differences = drift(database_url)

    assert differences == [], (
        f"the models and the migrations disagree ({'; '.join(differences)}): "
        f"write a revision with `{GENERATE}`, read it, and commit it"
    )


def test_the_check_catches_a_model_changed_without_a_migration(database_url: str) -> None:
    migrate(database_url)
    changed = MetaData()
    for table in SQLModel.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["users"].append_column(Column("nickname", String(40), nullable=True))

    assert drift(database_url, changed) == ["add_column users.nickname"]


def test_the_alembic_command_line_works_from_the_repository(
    database_url: str, tmp_path: Path
) -> None:
    """The commands the README gives: upgrade, check, and the offline --sql script."""

    def alembic_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=REPO,
            env={**os.environ, "DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    upgrade = alembic_cli("upgrade", "head")
    check = alembic_cli("check")
    offline = alembic_cli("upgrade", "head", "--sql")

    assert upgrade.returncode == 0, upgrade.stderr
    assert revisions(database_url) == [HEAD]
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    assert offline.returncode == 0, offline.stderr
    assert "CREATE TABLE users" in offline.stdout


def test_every_revision_downgrades_and_upgrades_again(database_url: str) -> None:
    """Round trip, one step at a time: each downgrade undoes its upgrade."""
    migrate(database_url)
    alembic(database_url, "downgrade", "base")
    assert table_names(database_url) == {"alembic_version"}
    assert revisions(database_url) == []

    for script in reversed(list(scripts().walk_revisions())):
        alembic(database_url, "upgrade", script.revision)
        schema = on(database_url, lambda connection: sorted(inspect(connection).get_table_names()))
        alembic(database_url, "downgrade", "-1")
        alembic(database_url, "upgrade", script.revision)
        assert (
            on(database_url, lambda connection: sorted(inspect(connection).get_table_names()))
            == schema
        )

    assert revisions(database_url) == [HEAD]
    assert drift(database_url) == []


def test_no_revision_leaves_its_downgrade_empty() -> None:
    for script in scripts().walk_revisions():
        tree = ast.parse(Path(script.path).read_text())
        downgrade = next(
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == "downgrade"
        )
        body = [
            node
            for node in downgrade.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]  # a docstring or a bare `...` is no downgrade; a call such as op.drop_column is
        assert body and not all(isinstance(node, ast.Pass) for node in body), script.path


# -- the same DDL as create_all ----------------------------------------------------------

CATALOG = """
SELECT 'column', table_name::text, format('%s %s %s %s %s %s', $1 * ordinal_position,
       column_name, data_type, character_maximum_length, is_nullable, column_default)
  FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', tablename::text, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass::text, conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'sequence', sequencename::text, '' FROM pg_sequences WHERE schemaname = 'public'
UNION ALL
SELECT 'type', typname::text, '' FROM pg_type
  WHERE typnamespace = 'public'::regnamespace AND typtype IN ('e', 'd', 'c') AND typrelid = 0
ORDER BY 1, 2, 3
"""


async def catalog(database_url: str, *, column_order: bool) -> list[tuple[str, str, str]]:
    """Columns (with types, nullability, defaults, and their positions if asked),
    indexes, constraints, sequences and types, as PostgreSQL itself describes them;
    the revision table aside."""
    connection = await asyncpg.connect(database_url, timeout=5)
    try:
        rows = await connection.fetch(CATALOG, int(column_order))
    finally:
        await connection.close()
    return [tuple(row) for row in rows if "alembic_version" not in (row[1], row[2])]


@pytest.mark.postgres
def test_upgrade_head_gives_exactly_the_schema_create_all_gives(postgres_url: str) -> None:
    """Column order aside: a column added by a later revision comes last in a
    migrated table, wherever the model declares it."""
    migrate(postgres_url)
    with fresh_postgres_database() as created_url:
        on(created_url, SQLModel.metadata.create_all)
        expected = asyncio.run(catalog(created_url, column_order=False))

    migrated = asyncio.run(catalog(postgres_url, column_order=False))

    assert len(expected) > 30  # the query sees the schema at all
    assert migrated == expected


@pytest.mark.postgres
def test_the_baseline_is_what_create_all_made_before_migrations(postgres_url: str) -> None:
    """Revision 0001 creates what `create_all` of its tables (the models of the
    release before migrations) created, column order included."""
    alembic(postgres_url, "upgrade", "0001")
    with fresh_postgres_database() as created_url:
        on(created_url, baseline_metadata().create_all)
        expected = asyncio.run(catalog(created_url, column_order=True))

    migrated = asyncio.run(catalog(postgres_url, column_order=True))

    assert len(expected) > 30
    assert migrated == expected


# -- several processes at once --------------------------------------------------------


def test_four_processes_migrating_at_once_migrate_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.db.schema")

    async def race() -> None:
        engines = [create_engine(make_settings(database_url)) for _ in range(4)]
        try:
            await asyncio.gather(*(init_db(engine) for engine in engines))
        finally:
            await asyncio.gather(*(engine.dispose() for engine in engines))

    asyncio.run(race())

    assert caplog.text.count(MIGRATED) == 1
    assert revisions(database_url) == [HEAD]


def run_procfile(
    process_type: str, database_url: str, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a Procfile command until it exits (the web command only exits on failure)."""
    return subprocess.run(
        procfile_command(process_type),
        shell=True,
        cwd=tmp_path,
        env={
            **os.environ,
            **env,
            "DATABASE_URL": database_url,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for_workers(log: Callable[[], str], workers: int, *, timeout: float = 60) -> None:
    give_up_at = time.monotonic() + timeout
    while log().count("Application startup complete") < workers:
        assert time.monotonic() < give_up_at, log()
        time.sleep(0.1)


@pytest.mark.process
def test_release_racing_four_workers_migrates_once(database_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": database_url, "WEB_CONCURRENCY": "4"}
    with running_service(env, tmp_path=tmp_path, wait=False) as web:
        release = run_procfile("release", database_url, tmp_path)
        wait_for_workers(web.log, 4)
        created = httpx.post(f"{web.base_url}/users", json=user_body(), timeout=10)
        log = web.log()

    assert release.returncode == 0, release.stderr
    assert created.status_code == 201
    assert "Traceback" not in log + release.stderr
    assert (log + release.stderr).count(MIGRATED) == 1
    assert revisions(database_url) == [HEAD]


@pytest.mark.process
@pytest.mark.timeout(600)  # 10 starts of 5 processes each, on a shared machine
def test_four_workers_on_a_fresh_sqlite_file_start_every_time(tmp_path: Path) -> None:
    """The embedded default, as a new user starts it: every one of 10 starts serves."""
    for start_number in range(10):
        database = tmp_path / f"start-{start_number}.db"
        env = {"DATABASE_URL": f"sqlite:///{database}", "WEB_CONCURRENCY": "4"}
        with running_service(env, tmp_path=tmp_path) as web:
            wait_for_workers(web.log, 4)
            created = httpx.post(f"{web.base_url}/users", json=user_body(), timeout=10)
            log = web.log()
        assert created.status_code == 201, log
        assert "Traceback" not in log
        assert log.count(MIGRATED) == 1


# -- PostgreSQL: transient failures and PgBouncer --------------------------------------


@pytest.mark.postgres
def test_a_lock_wait_that_times_out_is_retried_within_the_startup_deadline(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the migration lock longer than a statement may wait."""

    async def scenario() -> float:
        holder = await asyncpg.connect(postgres_url, timeout=5)
        await holder.execute(f"SELECT pg_advisory_lock({INIT_DB_LOCK_KEY})")
        started = time.monotonic()
        starting = asyncio.create_task(
            start(make_settings(postgres_url, db_statement_timeout_ms=500))
        )
        await asyncio.sleep(3)
        assert not starting.done()
        await holder.close()
        engine = await starting
        await engine.dispose()
        return time.monotonic() - started

    took = asyncio.run(scenario())

    assert 3 <= took < 15
    assert "retrying" in caplog.text
    assert revisions(postgres_url) == [HEAD]


@pytest.mark.process
@pytest.mark.postgres
def test_migrations_work_behind_pgbouncer_in_transaction_mode(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.db.schema")
    make_pre_migration_database(postgres_url)

    async def race(url: str) -> None:
        settings = make_settings(url, db_pgbouncer=True)
        engines = [create_engine(settings) for _ in range(4)]
        try:
            await asyncio.gather(*(init_db(engine) for engine in engines))
            await init_db(engines[0])
        finally:
            await asyncio.gather(*(engine.dispose() for engine in engines))

    with running_pgbouncer(postgres_url, pool_size=2) as bouncer:
        asyncio.run(race(bouncer.url_for(postgres_url)))

    assert caplog.text.count(MIGRATED) == 1
    assert revisions(postgres_url) == [HEAD]
