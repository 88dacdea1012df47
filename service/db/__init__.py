"""The database layer: engine and sessions (`engine`), the fair pool (`pool`),
the schema (`schema`; `compare` checks it, `migrations/` holds its Alembic
revisions) and read replicas (`replicas`). Import from here; the modules are
its parts."""

from service.db.engine import (
    ReadOnlySession,
    autocommit,
    create_engine,
    create_sessionmaker,
    dispose,
    pool_status,
)
from service.db.replicas import Replica, ReplicaSet, format_lsn, parse_lsn
from service.db.schema import SchemaMismatch, init_db

__all__ = [
    "ReadOnlySession",
    "Replica",
    "ReplicaSet",
    "SchemaMismatch",
    "autocommit",
    "create_engine",
    "create_sessionmaker",
    "dispose",
    "format_lsn",
    "init_db",
    "parse_lsn",
    "pool_status",
]
