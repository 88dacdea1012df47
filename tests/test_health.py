"""/health (readiness) and /health/live (liveness): their bodies and headers, and
what each says while the database refuses connections or silently stops answering."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.logs import RequestIdFilter
from service.routes import health
from tests.conftest import make_settings
from tests.proxy import Mode, in_front_of
from tests.support import parse_time, running_service

HEALTH_MEDIA_TYPE = "application/health+json"
# Liveness answers from memory; a second is a generous bound on a loaded machine.
LIVE_WITHIN_SECONDS = 1.0


def assert_database_check(body: dict[str, object], status: str) -> None:
    """The readiness body: one database check with a numeric time in ms, and pool figures."""
    assert body["status"] == status
    [check] = body["checks"]["database:responseTime"]  # type: ignore[index]
    assert check["status"] == status
    assert isinstance(check["observedValue"], int | float)
    assert not isinstance(check["observedValue"], bool)
    assert check["observedValue"] >= 0
    assert check["observedUnit"] == "ms"
    parse_time(check["time"])
    assert set(body["pool"]) >= {"size", "checked_out", "overflow"}  # type: ignore[arg-type]


def test_health_passes_with_the_check_and_pool_figures(client: TestClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.headers["content-type"] == HEALTH_MEDIA_TYPE
    assert response.headers["cache-control"] == "no-store"
    assert_database_check(response.json(), "pass")


@pytest.mark.parametrize("path", ["/health", "/health/live"])
def test_head_health_has_the_headers_and_no_body(client: TestClient, path: str) -> None:
    response = client.head(path)

    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"] == HEALTH_MEDIA_TYPE
    assert response.headers["cache-control"] == "no-store"


def test_liveness_is_pass_and_not_cached(client: TestClient) -> None:
    response = client.get("/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "pass"}
    assert response.headers["cache-control"] == "no-store"


def test_liveness_answers_with_the_routes_own_headers_and_body(client: TestClient) -> None:
    """The middleware answers GET /health/live ahead of the router, with the bytes the
    route's handler gives (and the request id every response carries)."""
    with TestClient(Starlette(routes=health.ROUTES)) as route_only:
        from_route = route_only.get("/health/live")
    response = client.get("/health/live", headers={"X-Request-ID": "r" * 20})

    assert response.status_code == from_route.status_code == 200
    assert response.content == from_route.content
    assert response.headers.multi_items() == [
        *from_route.headers.multi_items(),
        ("x-request-id", "r" * 20),
    ]


def test_liveness_needs_no_lifespan_state_and_head_sends_no_body(tmp_path: Path) -> None:
    """Called without the lifespan's state (no engine, no sessionmaker), it still
    answers: nothing under the middleware runs; HEAD's body is empty at the ASGI level."""
    app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path}/t.db"))

    async def call(method: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": "/health/live", "headers": []}
        await app(scope, receive, send)
        return sent

    for method, body in (("GET", b'{"status":"pass"}'), ("HEAD", b"")):
        start, end = asyncio.run(call(method))
        assert start["status"] == 200
        assert (b"content-length", b"17") in start["headers"]
        assert end == {"type": "http.response.body", "body": body}


def test_other_methods_on_liveness_still_get_the_routers_405(client: TestClient) -> None:
    response = client.post("/health/live")

    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert response.headers["content-type"] == "application/problem+json"


def test_liveness_is_logged_and_counted(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    request_ids: list[str] = []
    caplog.handler.addFilter(RequestIdFilter())
    with (
        caplog.at_level(logging.INFO, logger="service.access"),
        TestClient(create_app(settings)) as client,
    ):
        client.get("/health/live", headers={"X-Request-ID": "q" * 20})
        client.head("/health/live")
        scrape = client.get("/metrics").text
    for record in caplog.records:
        if record.name == "service.access" and "/health/live" in record.getMessage():
            request_ids.append(record.request_id)  # type: ignore[attr-defined]

    assert [
        r.getMessage().split()[:3] for r in caplog.records if "/health/live" in r.getMessage()
    ] == [
        ["GET", "/health/live", "200"],
        ["HEAD", "/health/live", "200"],
    ]
    assert request_ids[0] == "q" * 20 and len(request_ids[1]) == 32
    assert 'method="GET",route="/health/live",status_class="2xx"' in scrape
    assert 'method="HEAD",route="/health/live",status_class="2xx"' in scrape


def get_live(base_url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(f"{base_url}/health/live", timeout=10)
    return response, time.monotonic() - started


@pytest.mark.process
@pytest.mark.postgres
@pytest.mark.parametrize("mode", [Mode.REFUSE, Mode.SILENT])
def test_while_the_database_is_down_liveness_passes_and_readiness_fails(
    postgres_url: str, tmp_path: Path, mode: Mode
) -> None:
    with in_front_of(postgres_url) as (proxy, proxied_url):
        env = {"DATABASE_URL": proxied_url, "DB_STATEMENT_TIMEOUT_MS": "1000"}
        with running_service(env, tmp_path=tmp_path) as service:
            base = service.base_url
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200

            proxy.set_mode(mode)
            live_before, live_before_took = get_live(base)
            health = httpx.get(f"{base}/health", timeout=30)
            head = httpx.head(f"{base}/health", timeout=30)
            live_after, live_after_took = get_live(base)

    for live, took in ((live_before, live_before_took), (live_after, live_after_took)):
        assert live.status_code == 200
        assert live.headers["cache-control"] == "no-store"
        assert took < LIVE_WITHIN_SECONDS
    assert health.status_code == 503
    assert health.headers["content-type"] == HEALTH_MEDIA_TYPE
    assert health.headers["cache-control"] == "no-store"
    assert_database_check(health.json(), "fail")
    assert head.status_code == 503
    assert head.content == b""
    assert head.headers["cache-control"] == "no-store"
