"""/metrics: Prometheus text, summed over every worker, behind the bearer rule,
answering while the database is down; labels bounded; pool and 503 figures move."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from sqlalchemy.engine import make_url
from starlette.testclient import TestClient

from service.app import create_app
from service.metrics import record_idempotent_replay, record_replica_lag
from tests.conftest import make_settings
from tests.factories import create_user, user_body
from tests.proxy import Mode, TcpProxy
from tests.support import (
    Samples,
    ServiceProcess,
    metric,
    parse_metrics,
    running_service,
    scrape,
)

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def worker_pids(service: ServiceProcess) -> set[int]:
    """uvicorn's workers: the spawned processes of the service's process group."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[2]) == service.process.pid and stat[0] != "Z" and b"spawn_main" in cmdline:
            pids.add(int(proc.name))
    return pids


def requests_counted_per_file(directory: Path) -> dict[str, float]:
    """http_requests_total as each worker's own file holds it: the latency
    histogram's buckets, which the scrape sums into its _count."""
    counted = {}
    for path in directory.glob("histogram_*.db"):
        total = 0.0
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            metric_name, sample_name = json.loads(key)[:2]
            if metric_name == "http_request_duration_seconds" and sample_name.endswith("_bucket"):
                total += count
        counted[path.name] = total
    return counted


# -- in process ----------------------------------------------------------------


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path}/t.db"))) as client:
        yield client


def test_labels_are_route_templates_never_raw_paths(sqlite_client: TestClient) -> None:
    before = parse_metrics(sqlite_client.get("/metrics").text)
    user = create_user(sqlite_client)
    sqlite_client.get(f"/users/{user['uid']}")
    sqlite_client.get(f"/users/{uuid.uuid4()}")  # 404 from the handler: still the template
    sqlite_client.put(f"/users/{user['uid']}", json={})  # 405: the route matched
    sqlite_client.get(f"/no/such/{uuid.uuid4()}")
    sqlite_client.request("BREW", "/users")
    response = sqlite_client.get("/metrics")
    after = parse_metrics(response.text)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert response.headers["content-type"].startswith("text/plain")
    assert moved("http_requests_total", method="GET", route="/users/{uid}", status_class="2xx")
    assert moved("http_requests_total", method="GET", route="/users/{uid}", status_class="4xx")
    assert moved("http_requests_total", method="PUT", route="/users/{uid}", status_class="4xx")
    assert moved("http_requests_total", method="POST", route="/users", status_class="2xx") == 1
    assert moved("http_requests_total", method="GET", route="unmatched", status_class="4xx") == 1
    assert moved("http_requests_total", method="other", route="/users", status_class="4xx") == 1
    assert moved("http_request_duration_seconds_count", route="/users/{uid}") == 3
    assert user["uid"] not in response.text
    assert "/no/such" not in response.text


def test_the_request_count_is_a_counter_equal_to_the_histograms_count(
    sqlite_client: TestClient,
) -> None:
    """http_requests_total is read off the latency histogram at scrape time: still a
    counter, in both formats, with one series per label set of the histogram."""
    sqlite_client.get("/health/live")
    sqlite_client.get("/nowhere")
    text = sqlite_client.get("/metrics").text
    openmetrics = sqlite_client.get("/metrics", headers={"Accept": OPENMETRICS}).text
    samples = parse_metrics(text)

    def series(name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (n, labels), value in samples.items() if n == name}

    assert "# TYPE http_requests_total counter" in text.splitlines()
    assert "# TYPE http_requests counter" in openmetrics.splitlines()
    assert series("http_requests_total") == series("http_request_duration_seconds_count")
    assert len(series("http_requests_total")) >= 2


def test_latency_buckets_resolve_sub_millisecond_to_seconds(sqlite_client: TestClient) -> None:
    samples = parse_metrics(sqlite_client.get("/metrics").text)
    bounds = {
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "http_request_duration_seconds_bucket"
    }

    assert min(bounds) <= 0.0005
    assert {0.001, 0.01, 0.1, 1.0} <= bounds
    assert max(bounds - {float("inf")}) >= 10


def test_hooks_for_replicas_and_idempotency_show_in_the_scrape(sqlite_client: TestClient) -> None:
    before = parse_metrics(sqlite_client.get("/metrics").text)
    record_idempotent_replay()
    record_replica_lag("replica-1", 0.25)
    after = parse_metrics(sqlite_client.get("/metrics").text)

    replays = metric(after, "idempotent_replays_total") - metric(before, "idempotent_replays_total")
    assert replays == 1
    assert metric(after, "db_replica_lag_seconds", replica="replica-1") == 0.25


def test_metrics_follow_the_bearer_rule(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/t.db", api_keys=("scrape-key",))
    with TestClient(create_app(settings)) as client:
        anonymous = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        allowed = client.get("/metrics", headers={"Authorization": "Bearer scrape-key"})

    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == 200
    assert "http_requests_total" in allowed.text


def test_metrics_enabled_false_means_no_route(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/t.db", metrics_enabled=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/health/live").status_code == 200


# -- real processes ------------------------------------------------------------


@pytest.mark.process
@pytest.mark.postgres
def test_every_scrape_sums_every_worker(postgres_url: str, tmp_path: Path) -> None:
    """N requests on new connections land on both workers; whichever worker answers a
    scrape, it counts all N (one worker alone has counted fewer)."""
    directory = tmp_path / "metrics"
    env = {
        "DATABASE_URL": postgres_url,
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    requests = 200
    with running_service(env, tmp_path=tmp_path) as service:
        live = f"{service.base_url}/health/live"
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.get(live).status_code, range(requests)))
        per_worker = requests_counted_per_file(directory)
        scrapes = [scrape(service.base_url) for _ in range(20)]
        pool_size = metric(scrapes[-1], "db_pool_size", pool="primary")

    assert statuses == [200] * requests
    busy = [count for count in per_worker.values() if count > 0]
    assert len(busy) == 2, per_worker  # both workers served some of them
    for samples in scrapes:
        assert metric(samples, "http_requests_total", route="/health/live") >= requests
    assert pool_size == 10  # 5 per worker, both alive


@pytest.mark.process
@pytest.mark.postgres
def test_a_dead_worker_keeps_its_counts_and_leaves_the_live_gauges(
    postgres_url: str, tmp_path: Path
) -> None:
    """The default directory (no PROMETHEUS_MULTIPROC_DIR): a worker killed and
    replaced by uvicorn still counts in the totals, and no longer in pool sizes."""
    env = {"DATABASE_URL": postgres_url, "WEB_CONCURRENCY": "2"}
    requests = 100
    with running_service(env, tmp_path=tmp_path) as service:
        live = f"{service.base_url}/health/live"
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: httpx.get(live), range(requests)))
        workers = worker_pids(service)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        give_up_at = time.monotonic() + 30
        while service.log().count("Application startup complete") < 3:
            assert time.monotonic() < give_up_at, f"no replacement worker:\n{service.log()}"
            time.sleep(0.2)
        replacement = worker_pids(service) - workers
        scrapes = [scrape(service.base_url) for _ in range(10)]

    assert victim not in replacement and len(replacement) == 1

    for samples in scrapes:
        assert metric(samples, "http_requests_total", route="/health/live") >= requests
        assert metric(samples, "db_pool_size", pool="primary") == 10  # not 15: the dead one left
        assert metric(samples, "http_requests_in_flight") == 1  # this scrape


@pytest.mark.process
@pytest.mark.postgres
def test_a_configured_directory_is_emptied_at_startup(postgres_url: str, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": postgres_url,
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    with running_service(env, tmp_path=tmp_path) as service:
        for _ in range(30):
            httpx.get(f"{service.base_url}/health/live")
        first_run = metric(scrape(service.base_url), "http_requests_total", route="/health/live")
    with running_service(env, tmp_path=tmp_path) as service:
        second_run = metric(scrape(service.base_url), "http_requests_total", route="/health/live")

    assert first_run >= 30
    assert second_run < 30  # only this run's readiness polls


@pytest.mark.process
@pytest.mark.postgres
def test_metrics_answer_while_the_database_is_down(postgres_url: str, tmp_path: Path) -> None:
    url = make_url(postgres_url)
    with TcpProxy.running(url.host or "127.0.0.1", url.port or 5432) as proxy:
        through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        env = {"DATABASE_URL": through_proxy, "WEB_CONCURRENCY": "2", "API_KEYS": "k"}
        auth = {"Authorization": "Bearer k"}
        with running_service(env, tmp_path=tmp_path) as service:
            base = service.base_url
            before = scrape(base, **auth)
            proxy.set_mode(Mode.REFUSE)
            down = httpx.get(f"{base}/users", headers=auth, timeout=30)
            started = time.monotonic()
            after = scrape(base, **auth)
            took = time.monotonic() - started
            unauthorised = httpx.get(f"{base}/metrics")

    assert down.status_code == 503
    assert took < 2
    assert unauthorised.status_code == 401
    down_counted = metric(after, "http_unavailable_total", cause="database_down") - metric(
        before, "http_unavailable_total", cause="database_down"
    )
    assert down_counted == 1
    assert metric(after, "http_requests_total", route="/users", status_class="5xx") >= 1


@pytest.mark.process
@pytest.mark.postgres
def test_pool_figures_and_timeouts_move(postgres_url: str, tmp_path: Path) -> None:
    """One pooled connection, held by a read stuck behind a table lock: the pool
    shows it checked out, a second read waits and times out (pool_timeout), and
    the stuck read ends at the statement timeout (statement_timeout)."""
    env = {
        "DATABASE_URL": postgres_url,
        "DB_POOL_SIZE": "1",
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": "0.5",
        "DB_STATEMENT_TIMEOUT_MS": "2000",
    }

    async def scenario(base_url: str) -> tuple[Samples, Samples, int, int, Samples]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            before = parse_metrics((await client.get("/metrics")).text)
            locker = await asyncpg.connect(make_url(postgres_url).render_as_string(False))
            try:
                async with locker.transaction():
                    await locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                    stuck = asyncio.create_task(client.get("/users"))
                    await asyncio.sleep(0.3)
                    during = parse_metrics((await client.get("/metrics")).text)
                    refused = await client.get("/users")
                    stuck_status = (await stuck).status_code
            finally:
                await locker.close()
            after = parse_metrics((await client.get("/metrics")).text)
        return before, during, refused.status_code, stuck_status, after

    with running_service(env, tmp_path=tmp_path) as service:
        httpx.post(f"{service.base_url}/users", json=user_body())
        before, during, refused, stuck, after = asyncio.run(scenario(service.base_url))

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert (refused, stuck) == (503, 503)
    assert metric(during, "db_pool_size", pool="primary") == 1
    assert metric(during, "db_pool_checked_out", pool="primary") == 1
    assert metric(during, "http_requests_in_flight") == 2  # the stuck read and the scrape
    assert metric(after, "db_pool_checked_out", pool="primary") == 0
    assert metric(after, "db_pool_overflow", pool="primary") == 0
    assert moved("db_pool_timeouts_total", pool="primary") == 1
    assert moved("db_pool_wait_seconds_count", pool="primary") == 1
    assert moved("db_pool_wait_seconds_sum", pool="primary") >= 0.4
    assert moved("http_unavailable_total", cause="pool_timeout") == 1
    assert moved("http_unavailable_total", cause="statement_timeout") == 1
    assert moved("http_unavailable_total", cause="database_down") == 0
    assert moved("http_request_duration_seconds_sum", route="/users", status_class="5xx") >= 2


@pytest.mark.process
def test_an_empty_directory_variable_means_the_default(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR= (as a copied .env may have it) with one worker:
    prometheus-client treats it as set, so the server must give it a directory."""
    with running_service({"PROMETHEUS_MULTIPROC_DIR": ""}, tmp_path=tmp_path) as service:
        for _ in range(5):
            httpx.get(f"{service.base_url}/health/live")
        samples = scrape(service.base_url)

    assert metric(samples, "http_requests_total", route="/health/live") >= 5
    assert not list(tmp_path.glob("counter_*.db"))  # no metrics files in the working directory


@pytest.mark.process
def test_an_unusable_directory_stops_startup_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "a-file" / "metrics")}
    with running_service(env, tmp_path=tmp_path, wait=False) as service:
        service.process.wait(timeout=30)

    assert service.process.returncode == 1
    assert "PROMETHEUS_MULTIPROC_DIR: cannot use" in service.log()
    assert "Traceback" not in service.log()
