"""Conversations: owned by a user, listed most recently updated first."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import event
from starlette.testclient import TestClient

from tests.factories import create_conversation, create_message, create_user
from tests.support import assert_ids_and_times, parse_time

BAD_TITLES = [("", "empty"), ("x" * 201, "201 characters"), ("nul\x00byte", "NUL")]


def test_create_conversation_for_a_user(client: TestClient) -> None:
    user = create_user(client)

    response = client.post(f"/users/{user['uid']}/conversations", json={"title": "Engines"})

    assert response.status_code == 201
    conversation = response.json()
    assert response.headers["location"] == f"/conversations/{conversation['uid']}"
    assert conversation["user_uid"] == user["uid"]
    assert conversation["title"] == "Engines"
    assert client.get(response.headers["location"]).json() == conversation
    assert_ids_and_times(conversation, ids=["uid", "user_uid"], times=["created_at", "updated_at"])


def test_a_title_of_200_characters_is_accepted(client: TestClient) -> None:
    user = create_user(client)

    response = client.post(f"/users/{user['uid']}/conversations", json={"title": "x" * 200})

    assert response.status_code == 201, response.text


@pytest.mark.parametrize(("title", "why"), BAD_TITLES)
def test_a_bad_title_is_422_on_create(client: TestClient, title: str, why: str) -> None:
    user = create_user(client)
    path = f"/users/{user['uid']}/conversations"

    response = client.post(path, json={"title": title})

    assert response.status_code == 422, why
    assert response.json()["errors"][0]["loc"] == ["body", "title"]
    assert client.get(path).json()["items"] == []


@pytest.mark.parametrize(("title", "why"), BAD_TITLES)
def test_a_bad_title_is_422_on_patch(client: TestClient, title: str, why: str) -> None:
    conversation = create_conversation(client, create_user(client)["uid"])
    path = f"/conversations/{conversation['uid']}"

    response = client.patch(path, json={"title": title})

    assert response.status_code == 422, why
    assert response.json()["errors"][0]["loc"] == ["body", "title"]
    assert client.get(path).json()["title"] == conversation["title"]


def test_conversation_for_a_missing_user_is_404(client: TestClient) -> None:
    response = client.post(f"/users/{uuid.uuid4()}/conversations", json={"title": "x"})
    listing = client.get(f"/users/{uuid.uuid4()}/conversations")

    assert response.status_code == 404
    assert listing.status_code == 404


def test_lists_and_creates_ask_for_their_parent_only_when_they_must(client: TestClient) -> None:
    """A page with rows proves its parent exists, and a foreign key error tells a
    missing user: neither costs a round trip of its own."""
    statements: list[str] = []
    engine = client.app_state["engine"].sync_engine

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    user = create_user(client)
    conversation = create_conversation(client, user["uid"])
    create_message(client, conversation["uid"])
    empty_user = create_user(client)
    event.listen(engine, "before_cursor_execute", record)
    try:
        counts = {}
        for name, method, path, body in [
            ("conversations", "GET", f"/users/{user['uid']}/conversations", None),
            ("messages", "GET", f"/conversations/{conversation['uid']}/messages", None),
            ("empty", "GET", f"/users/{empty_user['uid']}/conversations", None),
            ("create", "POST", f"/users/{user['uid']}/conversations", {"title": "t"}),
            ("create for nobody", "POST", f"/users/{uuid.uuid4()}/conversations", {"title": "t"}),
        ]:
            statements.clear()
            response = client.request(method, path, json=body)
            assert response.status_code in (200, 201, 404)
            counts[name] = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert counts == {
        "conversations": 1,
        "messages": 1,
        "empty": 2,  # the page, then: is there such a user?
        "create": 1,  # the INSERT (BEGIN and COMMIT are not statements here)
        "create for nobody": 1,
    }


def test_adding_a_message_bumps_the_conversation(client: TestClient) -> None:
    user = create_user(client)
    conversation = create_conversation(client, user["uid"])

    message = create_message(client, conversation["uid"])

    after = client.get(f"/conversations/{conversation['uid']}").json()
    assert parse_time(after["updated_at"]) == parse_time(message["created_at"])
    assert parse_time(after["updated_at"]) > parse_time(conversation["updated_at"])


def test_list_is_most_recently_updated_first_and_pages(client: TestClient) -> None:
    user = create_user(client)
    first, second, third = (create_conversation(client, user["uid"], f"c{i}") for i in range(3))
    create_message(client, first["uid"])  # first is now the most recently updated
    other_user = create_user(client)
    create_conversation(client, other_user["uid"])

    page_one = client.get(f"/users/{user['uid']}/conversations", params={"limit": 2}).json()
    page_two = client.get(
        f"/users/{user['uid']}/conversations",
        params={"limit": 2, "cursor": page_one["next_cursor"]},
    ).json()

    order = [c["uid"] for c in page_one["items"] + page_two["items"]]
    assert order == [first["uid"], third["uid"], second["uid"]]
    assert page_two["next_cursor"] is None


def test_a_renamed_conversation_moves_to_the_top_of_its_list(client: TestClient) -> None:
    user = create_user(client)
    first, second, third = (create_conversation(client, user["uid"], f"c{i}") for i in range(3))
    path = f"/users/{user['uid']}/conversations"
    before = [c["uid"] for c in client.get(path).json()["items"]]

    renamed = client.patch(f"/conversations/{first['uid']}", json={"title": "Renamed"})

    assert renamed.status_code == 200, renamed.text
    assert parse_time(renamed.json()["updated_at"]) > parse_time(first["updated_at"])
    assert before == [third["uid"], second["uid"], first["uid"]]
    assert [c["uid"] for c in client.get(path).json()["items"]] == [
        first["uid"],
        third["uid"],
        second["uid"],
    ]


def test_patch_conversation_title_with_if_match(client: TestClient) -> None:
    conversation = create_conversation(client, create_user(client)["uid"])
    path = f"/conversations/{conversation['uid']}"
    etag = client.get(path).headers["etag"]

    renamed = client.patch(path, json={"title": "Renamed"}, headers={"If-Match": etag})
    stale = client.patch(path, json={"title": "Again"}, headers={"If-Match": etag})

    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Renamed"
    assert stale.status_code == 412
    assert client.get(path).json()["title"] == "Renamed"


def test_server_set_fields_cannot_be_patched(client: TestClient) -> None:
    conversation = create_conversation(client, create_user(client)["uid"])

    response = client.patch(
        f"/conversations/{conversation['uid']}", json={"user_uid": str(uuid.uuid4())}
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "user_uid"]


def test_delete_conversation_honours_if_match(client: TestClient) -> None:
    conversation = create_conversation(client, create_user(client)["uid"])
    path = f"/conversations/{conversation['uid']}"
    etag = client.get(path).headers["etag"]

    stale = client.delete(path, headers={"If-Match": '"stale"'})
    fresh = client.delete(path, headers={"If-Match": etag})

    assert stale.status_code == 412
    assert fresh.status_code == 204
    assert client.get(path).status_code == 404


def test_delete_conversation_removes_its_messages_only(client: TestClient) -> None:
    user = create_user(client)
    doomed = create_conversation(client, user["uid"])
    kept = create_conversation(client, user["uid"])
    doomed_message = create_message(client, doomed["uid"])
    kept_message = create_message(client, kept["uid"])

    assert client.delete(f"/conversations/{doomed['uid']}").status_code == 204

    assert client.get(f"/messages/{doomed_message['uid']}").status_code == 404
    assert client.get(f"/messages/{kept_message['uid']}").status_code == 200
    assert client.get(f"/users/{user['uid']}").status_code == 200
