"""Request bodies for tests: valid by default, with unique emails."""

from __future__ import annotations

import uuid
from typing import Any

from starlette.testclient import TestClient


def user_body(**overrides: Any) -> dict[str, Any]:
    body = {
        "username": "ada",
        "email": f"ada-{uuid.uuid4().hex[:10]}@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
    }
    return {**body, **overrides}


def create_user(client: TestClient, **overrides: Any) -> dict[str, Any]:
    response = client.post("/users", json=user_body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


def create_conversation(
    client: TestClient, user_uid: str, title: str = "Engines"
) -> dict[str, Any]:
    response = client.post(f"/users/{user_uid}/conversations", json={"title": title})
    assert response.status_code == 201, response.text
    return response.json()


def create_message(
    client: TestClient,
    conversation_uid: str,
    prompt: str | None = "Hi",
    response: str | None = None,
) -> dict[str, Any]:
    created = client.post(
        f"/conversations/{conversation_uid}/messages", json={"prompt": prompt, "response": response}
    )
    assert created.status_code == 201, created.text
    return created.json()
