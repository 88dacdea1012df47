"""How the service compares a database with table definitions, the way
`alembic check` does: for the adoption check of `init_db`, for env.py
(autogenerate and `alembic check`), and for the tests that keep the models and
the revisions in step."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Literal

from alembic.autogenerate import compare_metadata
from alembic.autogenerate.api import AutogenContext
from alembic.migration import MigrationContext
from sqlalchemy import Column, Connection, MetaData, inspect, text
from sqlalchemy.types import TypeDecorator


def render_item(type_: str, obj: Any, _: AutogenContext) -> str | Literal[False]:
    """Custom column types (the models' UTCDateTime, SQLModel's AutoString) go into
    revisions as the plain SQLAlchemy type they store, so a revision never imports
    code that may change after it was written."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def context_options() -> dict[str, Any]:
    """How every migration context compares and renders; the adoption check uses
    them too, so it sees what `alembic check` sees."""
    return {
        "render_as_batch": True,  # SQLite alters a table by copying it; harmless elsewhere
        "compare_type": True,
        "compare_server_default": True,
        "render_item": render_item,
    }


def schema_differences(
    connection: Connection, metadata: MetaData, *, ignore_other_tables: bool = False
) -> list[str]:
    """What autogenerate would change to make the database match `metadata`, one
    short line per change; empty when they agree.

    With `ignore_other_tables`, tables that `metadata` does not name are not
    differences (a database shared with other software). SQLite cannot reflect
    expression indexes such as lower(email), so there those are checked by name.
    """

    def include_object(_: object, name: str | None, kind: str, reflected: bool, __: object) -> bool:
        foreign = kind == "table" and reflected and name not in metadata.tables
        return not (ignore_other_tables and foreign)

    context = MigrationContext.configure(
        connection, opts={**context_options(), "include_object": include_object}
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*expression-based index")
        differences = [_describe(diff) for diff in _flatten(compare_metadata(context, metadata))]
    if connection.dialect.name == "sqlite":
        differences += _missing_expression_indexes(connection, metadata)
    return differences


def _flatten(diffs: list[Any]) -> Iterator[tuple[Any, ...]]:
    """A column's modifications come as a list of tuples; everything else as one tuple."""
    for diff in diffs:
        yield from diff if isinstance(diff, list) else [diff]


def _describe(diff: tuple[Any, ...]) -> str:
    """One difference in a few words: `add_column users.nickname`,
    `modify_nullable messages.prompt: True -> False`, `add_table sessions`."""
    kind = diff[0]
    if kind.startswith("modify_"):
        _, _, table, column, _, before, after = diff
        return f"{kind} {table}.{column}: {before} -> {after}"
    if kind in ("add_column", "remove_column"):
        return f"{kind} {diff[2]}.{diff[3].name}"
    item = diff[1]
    table = getattr(item, "table", None)
    if table is None:  # a table
        return f"{kind} {item.name}"
    columns = ", ".join(str(column) for column in getattr(item, "column_keys", None) or [])
    name = f" {item.name}" if item.name else ""
    return f"{kind}{name} on {table.name}{f'({columns})' if columns else ''}"


def _missing_expression_indexes(connection: Connection, metadata: MetaData) -> list[str]:
    names = {
        row[0]
        for row in connection.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'"))
    }
    inspector = inspect(connection)
    return [
        f"add_index {index.name} on {table.name}"
        for table in metadata.tables.values()
        if inspector.has_table(table.name)
        for index in table.indexes
        if not all(isinstance(part, Column) for part in index.expressions)
        and index.name not in names
    ]
