"""The /users routes, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.factories import create_conversation, create_message, create_user, user_body
from tests.support import assert_ids_and_times, parse_time


def test_create_user_returns_201_location_etag_and_server_fields(client: TestClient) -> None:
    response = client.post("/users", json=user_body(username="ada", email="Ada@Example.COM"))

    assert response.status_code == 201
    user = response.json()
    assert response.headers["location"] == f"/users/{user['uid']}"
    assert response.headers["etag"].startswith('"')
    assert_ids_and_times(user, ids=["uid"], times=["created_at", "updated_at"])
    assert user["email"] == "Ada@example.com"
    assert user["role"] == "user"
    assert user["is_verified"] is False
    assert user["verified_at"] is None
    assert parse_time(user["created_at"]) == parse_time(user["updated_at"])


def test_created_user_reads_back_identically(client: TestClient) -> None:
    created = client.post("/users", json=user_body(role="admin", is_verified=True))

    read = client.get(created.headers["location"])

    assert read.status_code == 200
    assert read.json() == created.json()
    assert read.headers["etag"] == created.headers["etag"]
    parse_time(read.json()["verified_at"])


def test_head_user_has_headers_and_no_body(client: TestClient) -> None:
    user = create_user(client)

    response = client.head(f"/users/{user['uid']}")

    assert response.status_code == 200
    assert response.content == b""
    assert "etag" in response.headers


def test_email_is_unique_case_insensitively(client: TestClient) -> None:
    create_user(client, email="grace@example.com")

    response = client.post("/users", json=user_body(email="GRACE@example.com"))

    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "email" in response.json()["detail"]


def test_patch_changes_only_given_fields_and_bumps_updated_at(client: TestClient) -> None:
    user = create_user(client, first_name="Ada")

    response = client.patch(f"/users/{user['uid']}", json={"last_name": "Byron"})

    assert response.status_code == 200
    patched = response.json()
    assert patched["last_name"] == "Byron"
    assert patched["first_name"] == "Ada"
    assert patched["created_at"] == user["created_at"]
    assert parse_time(patched["updated_at"]) > parse_time(user["updated_at"])
    assert client.get(f"/users/{user['uid']}").json() == patched


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nickname", "x"),
        ("uid", "00000000-0000-4000-8000-000000000000"),
        ("created_at", "2020-01-01T00:00:00Z"),
        ("updated_at", "2020-01-01T00:00:00Z"),
        ("verified_at", "2020-01-01T00:00:00Z"),
    ],
)
def test_patch_with_an_unknown_or_server_set_field_is_422(
    client: TestClient, field: str, value: str
) -> None:
    user = create_user(client)

    response = client.patch(f"/users/{user['uid']}", json={"username": "new", field: value})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", field]
    assert client.get(f"/users/{user['uid']}").json() == user


def test_verified_at_is_set_when_verified_and_cleared_when_not(client: TestClient) -> None:
    user = create_user(client)
    path = f"/users/{user['uid']}"

    def patch(body: dict[str, object]) -> dict[str, Any]:
        response = client.patch(path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    verified = patch({"is_verified": True})
    again = patch({"is_verified": True, "username": "ada2"})
    unverified = patch({"is_verified": False})

    assert parse_time(verified["verified_at"]) >= parse_time(user["created_at"])
    assert again["verified_at"] == verified["verified_at"]
    assert unverified["verified_at"] is None


def test_patch_to_a_taken_email_is_409(client: TestClient) -> None:
    create_user(client, email="taken@example.com")
    user = create_user(client)

    response = client.patch(f"/users/{user['uid']}", json={"email": "Taken@example.com"})

    assert response.status_code == 409
    assert client.get(f"/users/{user['uid']}").json()["email"] == user["email"]


def test_patch_and_delete_honour_if_match(client: TestClient) -> None:
    user = create_user(client)
    path = f"/users/{user['uid']}"
    etag = client.get(path).headers["etag"]

    stale = client.patch(path, json={"username": "x"}, headers={"If-Match": '"stale"'})
    weak = client.patch(path, json={"username": "x"}, headers={"If-Match": f"W/{etag}"})
    fresh = client.patch(path, json={"username": "x"}, headers={"If-Match": etag})
    delete_old = client.delete(path, headers={"If-Match": etag})
    delete_any = client.delete(path, headers={"If-Match": "*"})

    assert stale.status_code == 412
    assert weak.status_code == 412
    assert fresh.status_code == 200
    assert fresh.headers["etag"] != etag
    assert delete_old.status_code == 412
    assert delete_any.status_code == 204
    assert client.get(path).status_code == 404


def test_delete_user_removes_its_conversations_and_messages(client: TestClient) -> None:
    user = create_user(client)
    conversation = create_conversation(client, user["uid"])
    message = create_message(client, conversation["uid"])

    assert client.delete(f"/users/{user['uid']}").status_code == 204

    assert client.get(f"/users/{user['uid']}").status_code == 404
    assert client.get(f"/conversations/{conversation['uid']}").status_code == 404
    assert client.get(f"/messages/{message['uid']}").status_code == 404
    assert client.delete(f"/users/{user['uid']}").status_code == 404


def test_list_users_walks_every_user_oldest_first_without_repeats(client: TestClient) -> None:
    created = [create_user(client)["uid"] for _ in range(7)]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = client.get("/users", params=params).json()
        seen += [item["uid"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == created
    assert pages == 3


def test_list_users_defaults_to_50(client: TestClient) -> None:
    for _ in range(51):
        create_user(client)

    page = client.get("/users").json()

    assert len(page["items"]) == 50
    assert page["next_cursor"] is not None
