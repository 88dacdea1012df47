"""/health (readiness) and /health/live (liveness): their bodies and headers, and
what each says while the database refuses connections or silently stops answering."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

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
