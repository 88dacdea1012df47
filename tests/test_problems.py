"""Every row of the contract's Errors table, as problem+json, on both backends."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from service.app import create_app
from service.errors import NotFound
from service.problems import EXCEPTION_HANDLERS, ProblemResponses
from tests.conftest import make_settings
from tests.factories import create_conversation, create_user, user_body
from tests.support import encode_cursor, running_service

JSON_HEADERS = {"content-type": "application/json"}
PROBLEM_KEYS = {"type", "title", "status", "detail", "request_id"}


def assert_problem(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body.keys() >= PROBLEM_KEYS
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe", b"{'a': 1}", b"[" * 5000 + b"]" * 5000])
def test_body_that_is_not_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/users", content=raw, headers={"content-type": "application/json"})

    assert_problem(response, 400)


@pytest.mark.parametrize("raw", [b"[]", b'"user"', b"null", b"42"])
def test_body_that_is_not_an_object_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/users", content=raw, headers={"content-type": "application/json"})

    assert "JSON object" in assert_problem(response, 400)["detail"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_declared_json_is_415(
    client: TestClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/users", content=json.dumps(user_body()), headers=headers)

    assert_problem(response, 415)


def test_json_with_charset_or_suffix_is_accepted(client: TestClient) -> None:
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.post(
            "/users", content=json.dumps(user_body()), headers={"content-type": content_type}
        )
        assert response.status_code == 201, content_type


@pytest.fixture
def small_body_client(database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(database_url, max_body_bytes=1000))) as client:
        yield client


def test_declared_body_over_the_limit_is_413(small_body_client: TestClient) -> None:
    body = json.dumps(user_body(username="x" * 2000))

    response = small_body_client.post(
        "/users", content=body, headers={"content-type": "application/json"}
    )

    assert_problem(response, 413)


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"username": ""}, ["body", "username"]),
        ({"username": "x" * 65}, ["body", "username"]),
        ({"first_name": "x" * 101}, ["body", "first_name"]),
        ({"email": "not-an-email"}, ["body", "email"]),
        ({"email": "a" * 250 + "@example.com"}, ["body", "email"]),
        ({"role": "root"}, ["body", "role"]),
        ({"is_verified": "yes"}, ["body", "is_verified"]),
        ({"username": 42}, ["body", "username"]),
        ({"username": "nul\x00byte"}, ["body", "username"]),
        ({"uid": str(uuid.uuid4())}, ["body", "uid"]),
        ({"created_at": "2020-01-01T00:00:00Z"}, ["body", "created_at"]),
        ({"verified_at": None}, ["body", "verified_at"]),
        ({"nickname": "x"}, ["body", "nickname"]),
    ],
)
def test_invalid_user_is_422_naming_the_field(
    client: TestClient, overrides: dict[str, object], loc: list[str]
) -> None:
    response = client.post("/users", json=user_body(**overrides))

    body = assert_problem(response, 422)
    assert loc in [error["loc"] for error in body["errors"]]
    assert all(error["msg"] for error in body["errors"])
    assert client.get("/users").json()["items"] == []  # nothing half-written


def test_missing_required_fields_are_all_listed(client: TestClient) -> None:
    response = client.post("/users", json={})

    locs = [error["loc"] for error in assert_problem(response, 422)["errors"]]
    assert {tuple(loc) for loc in locs} >= {
        ("body", "username"),
        ("body", "email"),
        ("body", "first_name"),
        ("body", "last_name"),
    }


def test_a_body_of_many_unknown_fields_gets_a_short_422(tmp_path: Path) -> None:
    """A 1 MiB body of ~95,000 unknown fields: 50 errors and a count, quickly."""
    unknown = {f"f{n:05}": 1 for n in range(95_000)}
    raw = json.dumps({**user_body(email="bad"), **unknown}, separators=(",", ":")).encode()
    assert len(raw) < 1_048_576
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/many.db"}
    with running_service(env, tmp_path=tmp_path) as service, httpx.Client() as http:
        post = partial(
            http.post, f"{service.base_url}/users", content=raw, headers=JSON_HEADERS, timeout=30
        )
        post()  # warm up
        started = time.perf_counter()
        response = post()
        took = time.perf_counter() - started

    body = assert_problem(response, 422)
    assert len(response.content) < 10_000
    assert len(body["errors"]) == 50
    assert body["errors_omitted"] == 95_001 - 50  # the bad email counts too
    assert ["body", "email"] in [error["loc"] for error in body["errors"]]
    assert {"loc": ["body", "f00000"], "msg": "Extra inputs are not permitted"} in body["errors"]
    assert took < 0.4  # ~0.05 s; ~0.8 s when every error was built (in process)


def test_a_short_422_has_no_omitted_count(client: TestClient) -> None:
    body = assert_problem(client.post("/users", json={**user_body(), "nickname": "x"}), 422)

    assert body["errors"] == [
        {"loc": ["body", "nickname"], "msg": "Extra inputs are not permitted"}
    ]
    assert "errors_omitted" not in body


def test_lone_surrogate_is_422_on_every_backend(client: TestClient) -> None:
    user = create_user(client)
    conversation = create_conversation(client, user["uid"])

    response = client.post(
        f"/conversations/{conversation['uid']}/messages",
        content=b'{"prompt": "half \\ud800 a pair"}',
        headers={"content-type": "application/json"},
    )

    assert assert_problem(response, 422)["errors"][0]["loc"] == ["body", "prompt"]


def test_null_for_a_required_field_in_patch_is_422(client: TestClient) -> None:
    user = create_user(client)

    response = client.patch(f"/users/{user['uid']}", json={"username": None})

    assert_problem(response, 422)


@pytest.mark.parametrize(
    "path",
    [
        "/nowhere",
        f"/users/{uuid.uuid4()}",
        "/users/not-a-uuid",
        f"/conversations/{uuid.uuid4()}",
        f"/messages/{uuid.uuid4()}",
        "/messages/12345",
    ],
)
def test_unknown_route_or_id_is_404(client: TestClient, path: str) -> None:
    assert_problem(client.get(path), 404)


def test_patch_and_delete_of_unknown_ids_are_404(client: TestClient) -> None:
    missing = f"/users/{uuid.uuid4()}"

    assert_problem(client.patch(missing, json={"username": "x"}), 404)
    assert_problem(client.delete(missing), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", f"/users/{uuid.uuid4()}", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("DELETE", "/users", {"GET", "HEAD", "POST"}),
        ("POST", "/health", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: TestClient, method: str, path: str, allowed: set[str]
) -> None:
    response = client.request(method, path)

    assert_problem(response, 405)
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


@pytest.mark.parametrize("limit", ["0", "201", "-1", "ten", "1.5", "٣", "0050", "9" * 5000])
def test_bad_limit_is_422(client: TestClient, limit: str) -> None:
    body = assert_problem(client.get("/users", params={"limit": limit}), 422)

    assert body["errors"][0]["loc"] == ["query", "limit"]


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "e30",
        "WyJ4IiwgInkiXQ",
        encode_cursor(["2026-01-01T00:00:00+00:00", 5]),
        encode_cursor(["2026-01-01T00:00:00", uuid.uuid4().hex]),
        encode_cursor(["0001-01-01T00:00:00+14:00", uuid.uuid4().hex]),
        base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode(),
    ],
)
def test_bad_cursor_is_422(client: TestClient, cursor: str) -> None:
    body = assert_problem(client.get("/users", params={"cursor": cursor}), 422)

    assert body["errors"][0]["loc"] == ["query", "cursor"]


def test_incoming_request_id_is_kept_when_well_formed(client: TestClient) -> None:
    good = "abcDEF0123456789+/=-xyz"

    kept = client.get("/nowhere", headers={"X-Request-ID": good})
    replaced = client.get("/nowhere", headers={"X-Request-ID": "short"})
    bad_chars = client.get("/health/live", headers={"X-Request-ID": "a" * 30 + "<script>"})

    assert kept.headers["x-request-id"] == good
    assert kept.json()["request_id"] == good
    assert replaced.headers["x-request-id"] != "short"
    assert len(replaced.headers["x-request-id"]) >= 20
    assert bad_chars.headers["x-request-id"] != "a" * 30 + "<script>"


@pytest.mark.parametrize(("length", "kept"), [(19, False), (20, True), (200, True), (201, False)])
def test_incoming_request_id_is_kept_only_at_20_to_200_characters(
    client: TestClient, length: int, kept: bool
) -> None:
    incoming = ("aZ09+/=-" * 26)[:length]

    response = client.get("/nowhere", headers={"X-Request-ID": incoming})

    assert (response.headers["x-request-id"] == incoming) is kept
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert 20 <= len(response.headers["x-request-id"]) <= 200


def test_an_unexpected_error_in_a_handler_is_a_generic_problem_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's app has no Starlette error page under its request context: the
    context's own 500 is what the client gets, with no trace of the cause."""

    def broken_document() -> None:
        raise RuntimeError("password=hunter2 SELECT secret FROM vault")

    monkeypatch.setattr("service.app._document", broken_document)
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    with TestClient(create_app(settings)) as client:
        response = client.get("/openapi.json")

    body = assert_problem(response, 500)
    assert "hunter2" not in response.text and "vault" not in response.text
    assert body["detail"] == "the server failed to handle this request"


def test_problem_responses_render_by_class_and_never_after_the_response_started() -> None:
    """The layer under the middleware: a registered class (or a subclass) becomes its
    problem; an unregistered one, or one raised once the response has started, goes
    on up (to RequestContextMiddleware's 500, or the server cutting the connection)."""

    def app_raising(exc: Exception, *, after_start: bool) -> ProblemResponses:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if after_start:
                await send({"type": "http.response.start", "status": 200, "headers": []})
            raise exc

        return ProblemResponses(app, handlers=EXCEPTION_HANDLERS)

    async def call(app: ProblemResponses) -> list[Message]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "state": {}}
        await app(scope, receive, send)
        return sent

    start, _ = asyncio.run(call(app_raising(NotFound("gone"), after_start=False)))
    assert start["status"] == 404
    assert (b"content-type", b"application/problem+json") in start["headers"]
    with pytest.raises(NotFound):
        asyncio.run(call(app_raising(NotFound("gone"), after_start=True)))
    with pytest.raises(KeyError):
        asyncio.run(call(app_raising(KeyError("x"), after_start=False)))
