"""API_KEYS: bearer tokens on every route but /health*."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from tests.conftest import make_settings
from tests.factories import user_body


@pytest.fixture
def locked_client(database_url: str) -> Iterator[TestClient]:
    settings = make_settings(database_url, api_keys=("first-key", "second-key"))
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Bearer first-ke", "Basic Zmlyc3Qta2V5", "first-key", "Bearer "],
)
def test_missing_or_wrong_token_is_401(
    locked_client: TestClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    for method, path in [("GET", "/users"), ("POST", "/users"), ("GET", "/openapi.json")]:
        response = locked_client.request(method, path, headers=headers, json=user_body())
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("key", ["first-key", "second-key"])
def test_any_configured_key_is_accepted(locked_client: TestClient, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    assert locked_client.post("/users", json=user_body(), headers=headers).status_code == 201
    assert (
        locked_client.get("/users", headers={"Authorization": f"bearer {key}"}).status_code == 200
    )


def test_health_checks_need_no_token(locked_client: TestClient) -> None:
    assert locked_client.get("/health").status_code == 200
    assert locked_client.get("/health/live").status_code == 200
    assert locked_client.head("/health/live").status_code == 200


def test_an_open_service_warns_at_startup(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), TestClient(create_app(make_settings(database_url))):
        pass

    assert "API_KEYS is not set" in caplog.text


def test_a_locked_service_does_not_warn(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(database_url, api_keys=("k",))
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)):
        pass

    assert "API_KEYS" not in caplog.text
