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


BAD_AUTHORIZATIONS = [
    None,
    "Bearer wrong",
    "Bearer first-ke",
    "Basic Zmlyc3Qta2V5",
    "first-key",
    "Bearer ",
]
SOME_ID = "00000000-0000-4000-8000-000000000000"
# Every route and method but /health*: 401 comes before any lookup, so ids need not exist.
GUARDED = [
    ("GET", "/users"),
    ("POST", "/users"),
    ("GET", "/openapi.json"),
    ("GET", f"/users/{SOME_ID}"),
    ("HEAD", f"/users/{SOME_ID}"),
    ("PATCH", f"/users/{SOME_ID}"),
    ("DELETE", f"/users/{SOME_ID}"),
    ("GET", f"/users/{SOME_ID}/conversations"),
    ("POST", f"/users/{SOME_ID}/conversations"),
    ("GET", f"/conversations/{SOME_ID}"),
    ("HEAD", f"/conversations/{SOME_ID}"),
    ("PATCH", f"/conversations/{SOME_ID}"),
    ("DELETE", f"/conversations/{SOME_ID}"),
    ("GET", f"/conversations/{SOME_ID}/messages"),
    ("POST", f"/conversations/{SOME_ID}/messages"),
    ("GET", f"/messages/{SOME_ID}"),
    ("HEAD", f"/messages/{SOME_ID}"),
    ("PATCH", f"/messages/{SOME_ID}"),
    ("DELETE", f"/messages/{SOME_ID}"),
]


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATIONS)
def test_missing_or_wrong_token_is_401(
    locked_client: TestClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}

    for method, path in GUARDED:
        response = locked_client.request(method, path, headers=headers, json=user_body())
        where = f"{method} {path}"
        assert response.status_code == 401, where
        assert response.headers["www-authenticate"] == "Bearer", where
        assert response.headers["content-type"] == "application/problem+json", where
        if method != "HEAD":
            assert response.json()["request_id"] == response.headers["x-request-id"], where


def test_a_rejected_post_writes_nothing(locked_client: TestClient) -> None:
    auth = {"Authorization": "Bearer first-key"}
    user = locked_client.post("/users", json=user_body(), headers=auth)
    assert user.status_code == 201, user.text
    conversations = f"/users/{user.json()['uid']}/conversations"

    rejected = [
        locked_client.post("/users", json=user_body()),
        locked_client.post(conversations, json={"title": "t"}),
    ]

    assert [response.status_code for response in rejected] == [401, 401]
    assert len(locked_client.get("/users", headers=auth).json()["items"]) == 1
    assert locked_client.get(conversations, headers=auth).json()["items"] == []


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
