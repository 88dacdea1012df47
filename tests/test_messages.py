"""Messages: a prompt and/or a response, in a conversation, oldest first."""

from __future__ import annotations

import uuid

import pytest
from starlette.testclient import TestClient

from tests.factories import create_conversation, create_message, create_user


@pytest.fixture
def conversation(client: TestClient) -> dict[str, str]:
    return create_conversation(client, create_user(client)["uid"])


def test_create_message_takes_the_owner_from_the_conversation(
    client: TestClient, conversation: dict[str, str]
) -> None:
    response = client.post(
        f"/conversations/{conversation['uid']}/messages",
        json={"prompt": "What is an engine?", "response": "A machine."},
    )

    assert response.status_code == 201
    message = response.json()
    assert response.headers["location"] == f"/messages/{message['uid']}"
    assert message["conversation_uid"] == conversation["uid"]
    assert message["user_uid"] == conversation["user_uid"]
    assert client.get(response.headers["location"]).json() == message


@pytest.mark.parametrize(
    "body", [{"prompt": "p"}, {"response": "r"}, {"prompt": "", "response": None}]
)
def test_either_prompt_or_response_is_enough(
    client: TestClient, conversation: dict[str, str], body: dict[str, str | None]
) -> None:
    response = client.post(f"/conversations/{conversation['uid']}/messages", json=body)

    assert response.status_code == 201, response.text


@pytest.mark.parametrize("body", [{}, {"prompt": None, "response": None}])
def test_a_message_needs_a_prompt_or_a_response(
    client: TestClient, conversation: dict[str, str], body: dict[str, None]
) -> None:
    response = client.post(f"/conversations/{conversation['uid']}/messages", json=body)

    assert response.status_code == 422


def test_text_is_limited_to_100000_characters(
    client: TestClient, conversation: dict[str, str]
) -> None:
    path = f"/conversations/{conversation['uid']}/messages"

    at_limit = client.post(path, json={"prompt": "x" * 100_000})
    over = client.post(path, json={"response": "x" * 100_001})

    assert at_limit.status_code == 201
    assert over.status_code == 422
    assert over.json()["errors"][0]["loc"] == ["body", "response"]


def test_message_in_missing_conversation_is_404(client: TestClient) -> None:
    response = client.post(f"/conversations/{uuid.uuid4()}/messages", json={"prompt": "p"})
    listing = client.get(f"/conversations/{uuid.uuid4()}/messages")

    assert response.status_code == 404
    assert listing.status_code == 404


def test_list_messages_oldest_first_in_pages(
    client: TestClient, conversation: dict[str, str]
) -> None:
    created = [create_message(client, conversation["uid"], prompt=f"m{i}")["uid"] for i in range(5)]

    first = client.get(f"/conversations/{conversation['uid']}/messages", params={"limit": 4}).json()
    rest = client.get(
        f"/conversations/{conversation['uid']}/messages",
        params={"limit": 4, "cursor": first["next_cursor"]},
    ).json()

    assert [m["uid"] for m in first["items"] + rest["items"]] == created
    assert rest["next_cursor"] is None


def test_patch_may_not_leave_a_message_empty(
    client: TestClient, conversation: dict[str, str]
) -> None:
    message = create_message(client, conversation["uid"], prompt="p", response=None)
    path = f"/messages/{message['uid']}"

    emptied = client.patch(path, json={"prompt": None})
    swapped = client.patch(path, json={"prompt": None, "response": "r"})

    assert emptied.status_code == 422
    assert swapped.status_code == 200
    assert swapped.json()["prompt"] is None
    assert swapped.json()["response"] == "r"


def test_delete_message_with_if_match(client: TestClient, conversation: dict[str, str]) -> None:
    message = create_message(client, conversation["uid"])
    path = f"/messages/{message['uid']}"
    etag = client.get(path).headers["etag"]

    assert client.delete(path, headers={"If-Match": '"other"'}).status_code == 412
    assert client.delete(path, headers={"If-Match": etag}).status_code == 204
    assert client.get(path).status_code == 404
