"""Settings: every environment variable the service reads, parsed in one place.

Nothing happens at import time: `load_settings()` reads the environment (and a
`.env` file in the working directory, when there is one) each time it is
called, so tests and worker processes each build the settings they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from environs import Env, EnvValidationError
from marshmallow import ValidationError
from marshmallow.validate import Range
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./service.db"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_POSTGRES_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg"}
_SQLITE_SCHEMES = {"sqlite", "sqlite+aiosqlite"}


class ConfigError(Exception):
    """One or more variables are unusable; `lines` has one message per variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The parsed configuration. Build it with `load_settings()`."""

    database_url: URL
    port: int = 8000
    web_concurrency: int = 1
    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout: float = 5.0
    db_statement_timeout_ms: int = 15000
    db_pgbouncer: bool = False
    init_db: bool = True
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1048576
    log_level: str = "info"
    metrics_enabled: bool = True
    # Where every worker keeps its metrics so that one scrape sums them; unset: a
    # new temporary directory per dyno (one worker keeps them in memory).
    prometheus_multiproc_dir: str | None = None
    idempotency_ttl_seconds: int = 86400
    # True when the URL came from DATABASE_CONNECTION_POOL_URL (a hosted PgBouncer).
    via_connection_pool: bool = False
    database_replica_urls: tuple[URL, ...] = ()
    db_replica_max_lag_ms: int = 5000

    @property
    def connections_per_process(self) -> int:
        """The most database connections one worker process may open: one pool per
        database, the primary and each replica alike, and with replicas one more per
        database for the monitor that tracks their replay positions."""
        databases = 1 + len(self.database_replica_urls)
        monitors = databases if self.database_replica_urls else 0
        return self.connections_per_database * databases + monitors

    @property
    def connections_per_database(self) -> int:
        return self.db_pool_size + self.db_max_overflow

    @property
    def is_postgres(self) -> bool:
        return self.database_url.get_backend_name() == "postgresql"

    @property
    def safe_database_url(self) -> str:
        """The database URL with its password masked, for log lines."""
        return self.database_url.render_as_string(hide_password=True)


def _validate_log_level(value: str) -> None:
    if value.lower() not in LOG_LEVELS:
        raise ValidationError(f"must be one of {', '.join(LOG_LEVELS)}")


def normalize_database_url(raw: str) -> URL:
    """Turn the URL forms platforms hand out into ones SQLAlchemy's async drivers take.

    `postgres://` and `postgresql://` (Heroku's forms) become `postgresql+asyncpg://`
    and libpq's `sslmode=` becomes asyncpg's `ssl=`; plain `sqlite://` uses aiosqlite.
    """
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ValueError("not a database URL (expected scheme://...)") from exc
    if url.drivername in _POSTGRES_SCHEMES:
        query = dict(url.query)
        if "sslmode" in query:
            query["ssl"] = query.pop("sslmode")
        return url.set(drivername="postgresql+asyncpg", query=query)
    if url.drivername in _SQLITE_SCHEMES:
        return url.set(drivername="sqlite+aiosqlite")
    raise ValueError(
        f"unknown scheme {url.drivername!r} (expected postgres://, postgresql:// or sqlite://)"
    )


def parse_replica_urls(raw: str) -> tuple[URL, ...]:
    """Comma-separated PostgreSQL URLs in any form DATABASE_URL takes; a bad entry
    is named by its position, never echoed (it may hold a password)."""
    urls = []
    for position, entry in enumerate(raw.split(","), start=1):
        if not entry.strip():
            continue
        try:
            url = normalize_database_url(entry.strip())
        except ValueError as exc:
            raise ValueError(f"entry {position}: {exc}") from None
        if url.get_backend_name() != "postgresql":
            raise ValueError(f"entry {position}: a replica must be a PostgreSQL URL")
        urls.append(url)
    return tuple(urls)


def load_settings(*, env_file: str | Path | None = ".env") -> Settings:
    """Read every variable at once and report every bad one, not just the first.

    Raises `ConfigError` with one line per unusable variable.
    """
    env = Env(eager=False)
    if env_file is not None and Path(env_file).is_file():
        env.read_env(str(env_file), recurse=False)
    positive = Range(min=1)
    not_negative = Range(min=0)
    values = {
        "port": env.int("PORT", 8000, validate=Range(min=1, max=65535)),
        "web_concurrency": env.int("WEB_CONCURRENCY", 1, validate=positive),
        "db_pool_size": env.int("DB_POOL_SIZE", 5, validate=positive),
        "db_max_overflow": env.int("DB_MAX_OVERFLOW", 5, validate=not_negative),
        "db_pool_timeout": env.float(
            "DB_POOL_TIMEOUT", 5.0, validate=Range(min=0, min_inclusive=False)
        ),
        "db_statement_timeout_ms": env.int("DB_STATEMENT_TIMEOUT_MS", 15000, validate=positive),
        "db_pgbouncer": env.bool("DB_PGBOUNCER", False),
        "init_db": env.bool("INIT_DB", True),
        "api_keys": env.list("API_KEYS", []),
        "max_body_bytes": env.int("MAX_BODY_BYTES", 1048576, validate=positive),
        "log_level": env.str("LOG_LEVEL", "info", validate=_validate_log_level),
        "db_replica_max_lag_ms": env.int("DB_REPLICA_MAX_LAG_MS", 5000, validate=positive),
        "metrics_enabled": env.bool("METRICS_ENABLED", True),
        "prometheus_multiproc_dir": env.str("PROMETHEUS_MULTIPROC_DIR", None),
        "idempotency_ttl_seconds": env.int("IDEMPOTENCY_TTL_SECONDS", 86400, validate=positive),
    }
    raw_url = env.str("DATABASE_URL", DEFAULT_DATABASE_URL)
    # A hosted PgBouncer attaches this beside DATABASE_URL; when present it wins,
    # and it is always transaction mode.
    pool_url = env.str("DATABASE_CONNECTION_POOL_URL", None)
    raw_replica_urls = env.str("DATABASE_REPLICA_URLS", "")
    errors: list[str] = []
    try:
        env.seal()
    except EnvValidationError as exc:
        errors = [
            f"{name}: {'; '.join(map(str, msgs))}" for name, msgs in exc.error_messages.items()
        ]
    database_url: URL | None = None
    url_variable, url_value = (
        ("DATABASE_CONNECTION_POOL_URL", pool_url) if pool_url else ("DATABASE_URL", raw_url)
    )
    try:
        database_url = normalize_database_url(url_value)
    except ValueError as exc:
        errors.append(f"{url_variable}: {exc}")
    replica_urls: tuple[URL, ...] = ()
    try:
        replica_urls = parse_replica_urls(raw_replica_urls)
    except ValueError as exc:
        errors.append(f"DATABASE_REPLICA_URLS: {exc}")
    if (
        replica_urls
        and database_url is not None
        and database_url.get_backend_name() != "postgresql"
    ):
        errors.append(f"DATABASE_REPLICA_URLS: replicas need a PostgreSQL {url_variable}")
    if errors or database_url is None:
        raise ConfigError(sorted(errors))
    return Settings(
        database_url=database_url,
        port=values["port"],
        web_concurrency=values["web_concurrency"],
        db_pool_size=values["db_pool_size"],
        db_max_overflow=values["db_max_overflow"],
        db_pool_timeout=values["db_pool_timeout"],
        db_statement_timeout_ms=values["db_statement_timeout_ms"],
        db_pgbouncer=values["db_pgbouncer"] or bool(pool_url),
        init_db=values["init_db"],
        api_keys=tuple(key.strip() for key in values["api_keys"] if key.strip()),
        max_body_bytes=values["max_body_bytes"],
        log_level=values["log_level"].lower(),
        metrics_enabled=values["metrics_enabled"],
        prometheus_multiproc_dir=values["prometheus_multiproc_dir"] or None,
        idempotency_ttl_seconds=values["idempotency_ttl_seconds"],
        via_connection_pool=bool(pool_url),
        database_replica_urls=replica_urls,
        db_replica_max_lag_ms=values["db_replica_max_lag_ms"],
    )
