"""The database layer: engine and sessions (`engine`), the fair pool (`pool`)
and the schema (`schema`; `compare` checks it, `migrations/` holds its Alembic
revisions). Import from here; the modules are its parts."""

from service.db.engine import (
    ReadOnlySession,
    autocommit,
    create_engine,
    create_sessionmaker,
    pool_status,
)
from service.db.schema import SchemaMismatch, init_db

__all__ = [
    "ReadOnlySession",
    "SchemaMismatch",
    "autocommit",
    "create_engine",
    "create_sessionmaker",
    "init_db",
    "pool_status",
]
