"""Messages: a prompt and/or a response, in a conversation, oldest first."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from tests.factories import create_conversation, create_message, create_user, user_body
from tests.support import assert_ids_and_times, running_service

# Fields a client may not send: unknown ones, and those the service sets itself.
FORBIDDEN_FIELDS = [
    ("nickname", "x"),
    ("uid", str(uuid.uuid4())),
    ("conversation_uid", str(uuid.uuid4())),
    ("user_uid", str(uuid.uuid4())),
    ("created_at", "2020-01-01T00:00:00Z"),
    ("updated_at", "2020-01-01T00:00:00Z"),
]


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
    assert_ids_and_times(
        message, ids=["uid", "conversation_uid", "user_uid"], times=["created_at", "updated_at"]
    )


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


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_text_is_limited_to_100000_characters(
    client: TestClient, conversation: dict[str, str], field: str
) -> None:
    path = f"/conversations/{conversation['uid']}/messages"

    at_limit = client.post(path, json={field: "x" * 100_000})
    over = client.post(path, json={field: "x" * 100_001})

    assert at_limit.status_code == 201
    assert over.status_code == 422
    assert over.json()["errors"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_a_patch_over_100000_characters_is_422(
    client: TestClient, conversation: dict[str, str], field: str
) -> None:
    message = create_message(client, conversation["uid"], prompt="p", response="r")
    path = f"/messages/{message['uid']}"

    response = client.patch(path, json={field: "x" * 100_001})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", field]
    assert client.get(path).json()[field] == message[field]


@pytest.mark.parametrize(("field", "value"), FORBIDDEN_FIELDS)
def test_unknown_or_server_set_fields_are_422_on_create(
    client: TestClient, conversation: dict[str, str], field: str, value: str
) -> None:
    path = f"/conversations/{conversation['uid']}/messages"

    response = client.post(path, json={"prompt": "p", field: value})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", field]
    assert client.get(path).json()["items"] == []


@pytest.mark.parametrize(("field", "value"), FORBIDDEN_FIELDS)
def test_unknown_or_server_set_fields_are_422_on_patch(
    client: TestClient, conversation: dict[str, str], field: str, value: str
) -> None:
    message = create_message(client, conversation["uid"])
    path = f"/messages/{message['uid']}"

    response = client.patch(path, json={"prompt": "changed", field: value})

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", field]
    assert client.get(path).json() == message


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


def test_patch_message_honours_if_match(client: TestClient, conversation: dict[str, str]) -> None:
    message = create_message(client, conversation["uid"])
    path = f"/messages/{message['uid']}"
    etag = client.get(path).headers["etag"]

    fresh = client.patch(path, json={"response": "r"}, headers={"If-Match": etag})
    stale = client.patch(path, json={"response": "again"}, headers={"If-Match": etag})

    assert fresh.status_code == 200
    assert fresh.headers["etag"] != etag
    assert stale.status_code == 412
    assert client.get(path).json()["response"] == "r"


def test_delete_message_with_if_match(client: TestClient, conversation: dict[str, str]) -> None:
    message = create_message(client, conversation["uid"])
    path = f"/messages/{message['uid']}"
    etag = client.get(path).headers["etag"]

    assert client.delete(path, headers={"If-Match": '"other"'}).status_code == 412
    assert client.delete(path, headers={"If-Match": etag}).status_code == 204
    assert client.get(path).status_code == 404


def test_a_page_of_large_messages_stops_near_1_mib_and_the_walk_sees_each_once(
    database_url: str, tmp_path: Path
) -> None:
    """30 messages of ~200 KB each: `?limit=200` would be a 6 MB body. Pages stop
    past ~1 MiB (one ~1.2 MB message alone still makes a page) and continue."""
    with (
        running_service(
            {"DATABASE_URL": database_url, "MAX_BODY_BYTES": "2000000"}, tmp_path=tmp_path
        ) as service,
        httpx.Client(base_url=service.base_url, timeout=30) as http,
    ):
        user = http.post("/users", json=user_body()).json()
        conversation = http.post(
            f"/users/{user['uid']}/conversations", json={"title": "big"}
        ).json()
        path = f"/conversations/{conversation['uid']}/messages"
        texts = [f"{n:03}" + "é" * 99_997 for n in range(30)]
        texts.insert(10, "\x01" * 100_000)  # 600 KB as JSON escapes, twice
        for text in texts:
            body = {"prompt": text, "response": text}
            assert http.post(path, json=body).status_code == 201
        pages: list[httpx.Response] = []
        cursor = None
        while True:
            params = {"limit": "200", **({"cursor": cursor} if cursor else {})}
            pages.append(http.get(path, params=params))
            cursor = pages[-1].json()["next_cursor"]
            if cursor is None:
                break

    walked = [item["prompt"] for page in pages for item in page.json()["items"]]
    assert walked == texts  # every message once, in order
    assert len(pages) > 5
    assert all(page.status_code == 200 for page in pages)
    assert max(len(page.content) for page in pages) < 1_300_000
    assert [len(page.json()["items"]) for page in pages].count(1) >= 1  # the escaped one
