"""/openapi.json: every route, with schemas generated from the models."""

from __future__ import annotations

from starlette.testclient import TestClient

from service.models import UserCreate, UserPublic

EXPECTED = {
    "/health": {"get", "head"},
    "/health/live": {"get", "head"},
    "/users": {"get", "head", "post"},
    "/users/{uid}": {"get", "head", "patch", "delete"},
    "/users/{uid}/conversations": {"get", "head", "post"},
    "/conversations/{uid}": {"get", "head", "patch", "delete"},
    "/conversations/{uid}/messages": {"get", "head", "post"},
    "/messages/{uid}": {"get", "head", "patch", "delete"},
    "/openapi.json": {"get", "head"},
}


def test_document_lists_every_route_and_method(client: TestClient) -> None:
    document = client.get("/openapi.json").json()

    assert document["openapi"].startswith("3.1")
    assert {path: set(ops) for path, ops in document["paths"].items()} == EXPECTED


def test_schemas_come_from_the_models(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    create = schemas["UserCreate"]
    assert create["additionalProperties"] is False
    assert set(create["required"]) == {
        name for name, field in UserCreate.model_fields.items() if field.is_required()
    }
    assert create["properties"]["username"]["maxLength"] == 64
    assert set(schemas["UserPublic"]["properties"]) == set(UserPublic.model_fields)


def test_operations_document_their_errors(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    create_user = paths["/users"]["post"]
    assert {"201", "400", "409", "413", "415", "422", "503"} <= set(create_user["responses"])
    assert create_user["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UserCreate"
    }
    assert "412" in paths["/users/{uid}"]["patch"]["responses"]
    assert paths["/health"]["get"]["security"] == []
    assert [p["name"] for p in paths["/users"]["get"]["parameters"]] == ["limit", "cursor"]


def test_every_post_documents_idempotency_key(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    posts = [ops["post"] for ops in paths.values() if "post" in ops]
    assert len(posts) == 3
    for post in posts:
        (header,) = [p for p in post["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key"
        assert header["required"] is False
        assert header["schema"]["maxLength"] == 255
        assert {"400", "409", "422"} <= set(post["responses"])
        assert "Idempotent-Replayed" in post["responses"]["201"]["headers"]
    others = [op for ops in paths.values() for method, op in ops.items() if method != "post"]
    assert not any(p["in"] == "header" for op in others for p in op.get("parameters", []))
