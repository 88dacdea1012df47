"""The /users routes, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from tests.factories import create_conversation, create_message, create_user, user_body
from tests.support import assert_ids_and_times, parse_time, running_service


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


# Pairs of emails that are one user, though lower() on some backend tells them apart.
FOLDED_TWINS = [
    ("ÉMILE@example.org", "émile@example.org"),  # SQLite's lower() folds only ASCII
    ("STRASSE@example.org", "straße@example.org"),  # full case folding: ß is ss
    ("\uff21\uff24\uff21@example.org", "ada@example.org"),  # NFKC: fullwidth ADA is ADA
]


@pytest.mark.process
def test_emails_equal_after_unicode_case_folding_are_one_user(
    database_url: str, tmp_path: Path
) -> None:
    """Through the real process, on every backend: the second of each pair gets 409,
    whether created or patched in."""
    outcomes = {}
    with (
        running_service({"DATABASE_URL": database_url}, tmp_path=tmp_path) as web,
        httpx.Client(base_url=web.base_url, timeout=10) as http,
    ):
        for first, second in FOLDED_TWINS:
            created = http.post("/users", json=user_body(email=first))
            taken = http.post("/users", json=user_body(email=second))
            other = http.post("/users", json=user_body()).json()
            moved = http.patch(f"/users/{other['uid']}", json={"email": second})
            outcomes[second] = (created.status_code, taken.status_code, moved.status_code)
        problem = taken.json()

    assert outcomes == {second: (201, 409, 409) for _, second in FOLDED_TWINS}
    assert problem["detail"] == "a user with this email already exists"


def test_a_patched_email_takes_its_uniqueness_along(client: TestClient) -> None:
    user = create_user(client, email="ÉMILE@example.org")
    path = f"/users/{user['uid']}"

    recased = client.patch(path, json={"email": "émile@example.org"})
    moved = client.patch(path, json={"email": "straße@example.org"})
    freed = client.post("/users", json=user_body(email="Émile@example.org"))
    held = client.post("/users", json=user_body(email="STRASSE@example.org"))

    assert recased.status_code == 200  # the same user: its own key does not conflict
    assert moved.status_code == 200
    assert freed.status_code == 201
    assert held.status_code == 409


def test_domains_are_not_case_folded_past_idna(client: TestClient) -> None:
    """IDNA keeps ß in a domain: faß.de and fass.de are two domains."""
    create_user(client, email="ada@faß.de")

    other_domain = client.post("/users", json=user_body(email="ada@fass.de"))
    same_domain = client.post("/users", json=user_body(email="ada@FASS.de"))

    assert other_domain.status_code == 201
    assert same_domain.status_code == 409


def test_the_email_whose_key_is_longest_is_stored(client: TestClient) -> None:
    """NFKC turns U+FDFA into 18 characters: 64 of them make a 2.2 KB key, which must
    still fit PostgreSQL's index entry (about 2.7 KB), not end in a 500."""
    longest = "\ufdfa" * 64 + "@" + "b" * 57 + ".com"  # 254 bytes, the most allowed
    assert len(longest.encode()) == 254

    created = client.post("/users", json=user_body(email=longest))
    again = client.post("/users", json=user_body(email=longest))

    assert created.status_code == 201
    assert again.status_code == 409


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
