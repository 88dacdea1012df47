"""Fixtures: a clean environment for every test, and one backend-parametrised
database (a SQLite file always; a fresh PostgreSQL database where reachable)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings, normalize_database_url
from tests.support import SERVICE_VARIABLES, fresh_postgres_database


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No service variable leaks in from the shell, and no developer's .env is read."""
    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/test.db"
        return
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """For tests of PostgreSQL-only behaviour."""
    with fresh_postgres_database() as url:
        yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    return Settings(database_url=normalize_database_url(database_url), **overrides)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
