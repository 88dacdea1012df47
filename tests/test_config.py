"""Settings from the environment: URL forms, defaults, and bad values reported clearly."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.config import DEFAULT_DATABASE_URL, ConfigError, load_settings, normalize_database_url
from service.db import create_engine
from service.lifespan import StartupError, wait_for_database
from tests.conftest import make_settings
from tests.factories import user_body
from tests.support import REPO, SERVICE_VARIABLES


def test_defaults_match_the_contract() -> None:
    settings = load_settings()

    assert settings.database_url.render_as_string() == DEFAULT_DATABASE_URL
    assert (settings.port, settings.web_concurrency) == (8000, 1)
    assert (settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout) == (5, 5, 5)
    assert settings.db_statement_timeout_ms == 15000
    assert settings.db_pgbouncer is False
    assert settings.init_db is True
    assert settings.api_keys == ()
    assert settings.max_body_bytes == 1048576
    assert settings.log_level == "info"
    assert settings.database_replica_urls == ()
    assert settings.db_replica_max_lag_ms == 5000
    assert settings.metrics_enabled is True
    assert settings.prometheus_multiproc_dir is None
    assert settings.idempotency_ttl_seconds == 86400


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.example:5432/app", "postgresql+asyncpg://u:p@db.example:5432/app"),
        ("postgresql://u:p@db.example/app", "postgresql+asyncpg://u:p@db.example/app"),
        ("postgresql+asyncpg://u@h/app", "postgresql+asyncpg://u@h/app"),
        ("postgres://u:p@h/app?sslmode=require", "postgresql+asyncpg://u:p@h/app?ssl=require"),
        ("sqlite:///./local.db", "sqlite+aiosqlite:///./local.db"),
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+aiosqlite:////tmp/x.db"),
    ],
)
def test_database_url_forms(given: str, expected: str) -> None:
    assert normalize_database_url(given).render_as_string(hide_password=False) == expected


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@pytest.mark.parametrize("sslmode", SSLMODES)
def test_every_libpq_sslmode_becomes_asyncpgs_ssl(sslmode: str) -> None:
    url = normalize_database_url(f"postgres://u@h/app?sslmode={sslmode}")

    assert dict(url.query) == {"ssl": sslmode}


@pytest.mark.postgres
@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
def test_sslmodes_that_allow_plain_connections_serve(postgres_url: str, sslmode: str) -> None:
    """The test server has no TLS: these modes must still connect and serve."""
    settings = make_settings(f"{postgres_url}?sslmode={sslmode}")

    with TestClient(create_app(settings)) as client:
        created = client.post("/users", json=user_body())

    assert created.status_code == 201, created.text


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("sslmode", "reason"),
    [
        ("require", "rejected SSL upgrade"),
        ("verify-ca", "root certificate"),
        ("verify-full", "root certificate"),
    ],
)
def test_sslmodes_that_demand_tls_reach_the_driver(
    postgres_url: str, sslmode: str, reason: str
) -> None:
    """Against a server without TLS, these modes must fail: proof the mode is applied."""
    engine = create_engine(make_settings(f"{postgres_url}?sslmode={sslmode}"))

    async def attempt() -> None:
        try:
            await wait_for_database(engine, deadline_seconds=1)
        finally:
            await engine.dispose()

    with pytest.raises(StartupError, match=reason):
        asyncio.run(attempt())


def test_every_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "DATABASE_URL": "postgres://u:secret@h/app",
        "PORT": "5001",
        "WEB_CONCURRENCY": "3",
        "DB_POOL_SIZE": "7",
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": "2.5",
        "DB_STATEMENT_TIMEOUT_MS": "900",
        "DB_PGBOUNCER": "true",
        "INIT_DB": "false",
        "API_KEYS": "k1, k2,,",
        "MAX_BODY_BYTES": "2048",
        "LOG_LEVEL": "DEBUG",
        "DATABASE_REPLICA_URLS": "postgres://u:secret@r1/app, postgresql://u@r2/app?sslmode=require",
        "DB_REPLICA_MAX_LAG_MS": "1500",
        "METRICS_ENABLED": "false",
        "PROMETHEUS_MULTIPROC_DIR": "/run/metrics",
        "IDEMPOTENCY_TTL_SECONDS": "60",
    }
    # DATABASE_CONNECTION_POOL_URL replaces DATABASE_URL: it has a test of its own.
    assert {*values, "DATABASE_CONNECTION_POOL_URL"} == set(SERVICE_VARIABLES)
    for name, value in values.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.safe_database_url == "postgresql+asyncpg://u:***@h/app"
    assert (settings.port, settings.web_concurrency) == (5001, 3)
    assert (settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout) == (
        7,
        0,
        2.5,
    )
    assert settings.db_statement_timeout_ms == 900
    assert settings.db_pgbouncer is True
    assert settings.init_db is False
    assert settings.api_keys == ("k1", "k2")
    assert settings.max_body_bytes == 2048
    assert settings.log_level == "debug"
    assert [url.render_as_string() for url in settings.database_replica_urls] == [
        "postgresql+asyncpg://u:***@r1/app",
        "postgresql+asyncpg://u@r2/app?ssl=require",
    ]
    assert settings.db_replica_max_lag_ms == 1500
    # One pool per database plus, with replicas, one monitor connection per database.
    assert settings.connections_per_process == 3 * (7 + 0) + 3
    assert settings.metrics_enabled is False
    assert settings.prometheus_multiproc_dir == "/run/metrics"
    assert settings.idempotency_ttl_seconds == 60


def test_dot_env_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=6123\nLOG_LEVEL=warning\n")

    settings = load_settings()

    assert settings.port == 6123
    assert settings.log_level == "warning"


def test_environment_wins_over_dot_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PORT=6123\n")
    monkeypatch.setenv("PORT", "7000")

    assert load_settings().port == 7000


def test_connection_pool_url_wins_and_turns_on_pgbouncer_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:p@db/app")
    monkeypatch.setenv("DATABASE_CONNECTION_POOL_URL", "postgres://u:p@bouncer:6432/app")

    settings = load_settings()

    assert settings.database_url.host == "bouncer"
    assert settings.db_pgbouncer is True
    assert settings.via_connection_pool is True


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://root@localhost/app"),
        ("DATABASE_CONNECTION_POOL_URL", "mysql://root@localhost/app"),
        ("DATABASE_URL", "not a url"),
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("WEB_CONCURRENCY", "0"),
        ("WEB_CONCURRENCY", "many"),
        ("DB_POOL_SIZE", "0"),
        ("DB_MAX_OVERFLOW", "-1"),
        ("DB_POOL_TIMEOUT", "0"),
        ("DB_POOL_TIMEOUT", "soon"),
        ("DB_STATEMENT_TIMEOUT_MS", "1.5"),
        ("DB_STATEMENT_TIMEOUT_MS", "0"),  # every wait must stay bounded
        ("DB_PGBOUNCER", "maybe"),
        ("INIT_DB", "perhaps"),
        ("MAX_BODY_BYTES", "0"),
        ("LOG_LEVEL", "loud"),
        ("DB_REPLICA_MAX_LAG_MS", "0"),
        ("DB_REPLICA_MAX_LAG_MS", "soon"),
        ("IDEMPOTENCY_TTL_SECONDS", "0"),
        ("IDEMPOTENCY_TTL_SECONDS", "a day"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert len(raised.value.lines) == 1
    assert raised.value.lines[0].startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("postgres://u:pw@r1/app,redis://u:pw@r2", "entry 2: unknown scheme 'redis'"),
        ("not a url", "entry 1: not a database URL"),
        ("sqlite:///./replica.db", "entry 1: a replica must be a PostgreSQL URL"),
    ],
)
def test_a_bad_replica_url_is_named_by_position_without_its_password(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u:pw@primary/app")
    monkeypatch.setenv("DATABASE_REPLICA_URLS", value)

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert len(raised.value.lines) == 1
    assert raised.value.lines[0].startswith(f"DATABASE_REPLICA_URLS: {message}")
    assert "pw" not in raised.value.lines[0]


def test_replicas_need_a_postgres_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_REPLICA_URLS", "postgres://u@r1/app")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert raised.value.lines == ["DATABASE_REPLICA_URLS: replicas need a PostgreSQL DATABASE_URL"]


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "x")
    monkeypatch.setenv("WEB_CONCURRENCY", "y")
    monkeypatch.setenv("DATABASE_URL", "redis://localhost")

    with pytest.raises(ConfigError) as raised:
        load_settings()

    assert [line.split(":")[0] for line in raised.value.lines] == [
        "DATABASE_URL",
        "PORT",
        "WEB_CONCURRENCY",
    ]


@pytest.mark.parametrize("command", [["serve"], ["init-db"]])
def test_the_command_line_stops_with_one_line_per_bad_variable(
    tmp_path: Path, command: list[str]
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PORT": "abc", "WEB_CONCURRENCY": "-2"}

    result = subprocess.run(
        [sys.executable, "-m", "service", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "configuration error: PORT: Not a valid integer.",
        "configuration error: WEB_CONCURRENCY: Must be greater than or equal to 1.",
    ]
    assert "Traceback" not in result.stderr
    assert "--port" not in result.stderr


def test_dot_env_example_lists_every_variable_and_works_as_is() -> None:
    example = REPO / ".env.example"
    listed = {
        line.lstrip("# ").split("=")[0]
        for line in example.read_text().splitlines()
        if re.match(r"^#? ?[A-Z_]+=", line)
    }

    settings = load_settings(env_file=example)

    assert listed == set(SERVICE_VARIABLES)
    assert settings.database_url.render_as_string() == DEFAULT_DATABASE_URL
    assert settings.api_keys == ()
