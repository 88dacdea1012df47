"""Read replicas against a real streaming replica (tests/replica_cluster.py) and
the service started from the Procfile: routing, read-your-writes, faults."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from starlette.datastructures import Headers

from service.config import Settings, normalize_database_url
from service.consistency import presented_token
from service.db import ReplicaSet, format_lsn, parse_lsn
from tests.factories import user_body
from tests.replica_cluster import Cluster, running_cluster
from tests.support import ServiceProcess, execute, fetch_value, metric, running_service, scrape

pytestmark = pytest.mark.postgres

WAIT_SECONDS = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster() as started:
        yield started


@dataclass
class Databases:
    primary: str
    replica: str


@pytest.fixture
def databases(cluster: Cluster) -> Iterator[Databases]:
    """A fresh database on the primary, once the replica has it too; afterwards the
    replica is running and replaying again, whatever the test did to it."""
    name = f"replicas_{uuid.uuid4().hex[:10]}"
    asyncio.run(execute(cluster.primary_url, f'CREATE DATABASE "{name}"'))
    on = Databases(
        primary=make_url(cluster.primary_url).set(database=name).render_as_string(False),
        replica=make_url(cluster.replica_url).set(database=name).render_as_string(False),
    )
    wait_for(lambda: _answers(on.replica), "the replica to have the new database")
    try:
        yield on
    finally:
        if not _answers(cluster.replica_url):
            cluster.start_replica()
        asyncio.run(execute(cluster.replica_url, "SELECT pg_wal_replay_resume()"))
        asyncio.run(execute(cluster.primary_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


def _answers(url: str) -> bool:
    try:
        asyncio.run(fetch_value(url, "SELECT 1"))
    except Exception:
        return False
    return True


def wait_for(condition: Callable[[], Any], what: str, *, timeout: float = WAIT_SECONDS) -> Any:
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout} s for {what}")


@pytest.fixture
def service_with_replica(
    databases: Databases, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ServiceProcess]:
    max_lag_ms = getattr(request, "param", 30000)
    env = {
        "DATABASE_URL": databases.primary,
        "DATABASE_REPLICA_URLS": databases.replica,
        "DB_REPLICA_MAX_LAG_MS": str(max_lag_ms),
    }
    with running_service(env, tmp_path=tmp_path) as service:
        wait_for(lambda: replica_health(service)["status"] == "pass", "the replica to serve")
        yield service


def replica_health(service: ServiceProcess) -> dict[str, Any]:
    health = httpx.get(f"{service.base_url}/health", timeout=10)
    assert health.status_code == 200, health.text
    (replica,) = health.json()["replicas"]
    return replica


def pause_replay(databases: Databases) -> None:
    asyncio.run(execute(databases.replica, "SELECT pg_wal_replay_pause()"))
    state = "SELECT pg_get_wal_replay_pause_state()"
    wait_for(lambda: asyncio.run(fetch_value(databases.replica, state)) == "paused", "a pause")


def resume_replay(databases: Databases) -> None:
    asyncio.run(execute(databases.replica, "SELECT pg_wal_replay_resume()"))


@pytest.mark.process
def test_a_client_reads_its_own_writes_while_others_read_the_replica(
    service_with_replica: ServiceProcess, databases: Databases
) -> None:
    base = service_with_replica.base_url
    pause_replay(databases)
    with httpx.Client(base_url=base) as writer, httpx.Client(base_url=base) as other:
        created = writer.post("/users", json=user_body(username="before"))
        path = created.headers["location"]
        token = created.headers["x-consistency-token"]

        unseen = other.get(path)  # no token: the paused replica, which lacks the row
        by_cookie = writer.get(path)
        by_header = other.get(path, headers={"X-Consistency-Token": token})
        malformed = [
            other.get(path, headers={"X-Consistency-Token": bad})
            for bad in ("garbage", "1/2/3", "G/0", "123456789/0", "", "0/" + "F" * 40)
        ]
        malformed_cookie = httpx.get(f"{base}{path}", cookies={"consistency_token": "%%%"})

        patched = writer.patch(path, json={"username": "after"})
        reread = writer.get(path)

    assert created.status_code == 201
    cookie = created.headers["set-cookie"]
    assert cookie.startswith(f"consistency_token={token};")
    for attribute in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=32"):
        assert attribute in cookie
    assert unseen.status_code == 404
    assert by_cookie.status_code == 200
    assert by_header.status_code == 200
    assert [response.status_code for response in malformed] == [404] * len(malformed)
    assert malformed_cookie.status_code == 404
    assert patched.status_code == 200
    assert (parse_lsn(patched.headers["x-consistency-token"]) or 0) > (parse_lsn(token) or 0)
    assert reread.status_code == 200
    assert reread.json()["username"] == "after"


@pytest.mark.process
def test_reads_without_a_write_get_no_token_and_go_to_the_replica(
    service_with_replica: ServiceProcess, databases: Databases
) -> None:
    base = service_with_replica.base_url
    uid = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    wait_for(lambda: replica_health(service_with_replica)["lag_ms"] == 0, "the replica to catch up")
    pause_replay(databases)
    asyncio.run(execute(databases.primary, f"DELETE FROM users WHERE uid = '{uid}'"))

    read = httpx.get(f"{base}/users/{uid}")  # the replica has not replayed the delete
    head = httpx.head(f"{base}/users/{uid}")
    failed_write = httpx.post(f"{base}/users", json={"username": ""})

    assert read.status_code == 200
    assert head.status_code == 200
    assert "x-consistency-token" not in read.headers
    assert "set-cookie" not in read.headers
    assert failed_write.status_code == 422
    assert "x-consistency-token" not in failed_write.headers
    # A pool of 5 + 5 for the primary and for the replica, and a monitor connection each.
    assert "this process may open up to 22 connections" in service_with_replica.log()


def reads_in_a_loop(base: str, uid: str, stop: threading.Event) -> list[int]:
    """Statuses of back-to-back reads by 4 clients until `stop` is set."""
    statuses: list[int] = []

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.get(f"/users/{uid}").status_code)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join()
    return statuses


@pytest.mark.process
def test_a_replica_that_dies_costs_no_request_and_gets_reads_back_when_up(
    service_with_replica: ServiceProcess, databases: Databases, cluster: Cluster
) -> None:
    service = service_with_replica
    base = service.base_url
    uid = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    wait_for(lambda: replica_health(service)["lag_ms"] == 0, "the replica to catch up")
    stop = threading.Event()
    results: list[list[int]] = []
    loader = threading.Thread(target=lambda: results.append(reads_in_a_loop(base, uid, stop)))
    loader.start()
    try:
        time.sleep(1)
        cluster.stop_replica()
        time.sleep(2)
        down = replica_health(service)
    finally:
        stop.set()
        loader.join()
    cluster.start_replica()
    back = wait_for(lambda: (r := replica_health(service))["status"] == "pass" and r, "recovery")
    pause_replay(databases)
    uid_after = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    served_by_replica = httpx.get(f"{base}/users/{uid_after}")

    (statuses,) = results
    assert len(statuses) > 50
    assert set(statuses) == {200}
    assert down["status"] == "fail"
    assert back["lag_ms"] is not None
    assert served_by_replica.status_code == 404  # reads went back to the paused replica


@pytest.mark.process
@pytest.mark.parametrize("service_with_replica", [2000], indirect=True)
def test_a_replica_behind_the_bound_gets_no_reads_until_it_catches_up(
    service_with_replica: ServiceProcess, databases: Databases
) -> None:
    service = service_with_replica
    base = service.base_url
    time.sleep(3)  # an idle primary is not lag: still serving after longer than the bound
    idle = replica_health(service)
    pause_replay(databases)
    written_at = time.monotonic()
    uid = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    first = httpx.get(f"{base}/users/{uid}")  # a fresh client: no token
    wait_for(lambda: httpx.get(f"{base}/users/{uid}").status_code == 200, "the primary to serve")
    moved_after = time.monotonic() - written_at
    lagging = replica_health(service)
    resume_replay(databases)
    caught_up = wait_for(lambda: (r := replica_health(service))["status"] == "pass" and r, "pass")

    assert idle == {**idle, "status": "pass", "lag_ms": 0}
    assert first.status_code == 404  # still within the bound: the replica, without the row
    assert 1.5 < moved_after < 10
    assert lagging["status"] == "warn"
    assert lagging["lag_ms"] > 2000
    assert caught_up["lag_ms"] == 0


@pytest.mark.process
def test_the_replica_pool_and_lag_are_in_the_metrics(
    service_with_replica: ServiceProcess, databases: Databases
) -> None:
    service = service_with_replica
    base = service.base_url
    name = replica_health(service)["name"]
    uid = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    wait_for(lambda: httpx.get(f"{base}/users/{uid}").status_code == 200, "the replica to serve")
    level = scrape(base)
    pause_replay(databases)
    httpx.post(f"{base}/users", json=user_body())
    behind = wait_for(
        lambda: (s := scrape(base)) and metric(s, "db_replica_lag_seconds", replica=name) > 1 and s,
        "the lag to show",
    )
    resume_replay(databases)
    wait_for(
        lambda: metric(scrape(base), "db_replica_lag_seconds", replica=name) == 0, "no lag again"
    )

    assert metric(level, "db_pool_size", pool=name) == 5
    assert metric(level, "db_pool_size", pool="primary") == 5
    assert metric(level, "db_pool_checked_out", pool=name) == 0
    assert metric(level, "db_replica_lag_seconds", replica=name) == 0
    assert metric(behind, "db_replica_lag_seconds", replica=name) > 1


@pytest.mark.process
def test_dead_pooled_connections_on_the_replica_cost_no_request(
    service_with_replica: ServiceProcess, databases: Databases
) -> None:
    service = service_with_replica
    base = service.base_url
    uid = httpx.post(f"{base}/users", json=user_body()).json()["uid"]
    wait_for(lambda: replica_health(service)["lag_ms"] == 0, "the replica to catch up")

    async def fill_the_pool() -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*(client.get(f"{base}/users/{uid}") for _ in range(20)))

    asyncio.run(fill_the_pool())
    name = make_url(databases.replica).database
    ended = asyncio.run(
        fetch_value(
            databases.replica,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
    )
    time.sleep(0.5)
    with httpx.Client(base_url=base) as client:
        statuses = [client.get(f"/users/{uid}").status_code for _ in range(40)]

    assert isinstance(ended, int) and ended >= 2
    assert statuses == [200] * 40
    assert "is down" not in service.log()  # replaced on the replica, not retried elsewhere


@pytest.mark.parametrize(
    ("header", "cookie", "expected"),
    [
        ("0/3001150", None, "0/3001150"),
        (None, "A/FF", "A/FF"),
        ("1/0", "0/FFFFFFFF", "1/0"),  # the newer of the two
        ("garbage", "0/10", "0/10"),
        ("G/1", None, None),
        ("1/2/3", "", None),
        (" 0/1", None, None),
        ("123456789/0", None, None),
    ],
)
def test_token_parsing(header: str | None, cookie: str | None, expected: str | None) -> None:
    raw: list[tuple[bytes, bytes]] = []
    if header is not None:
        raw.append((b"x-consistency-token", header.encode()))
    if cookie is not None:
        raw.append((b"cookie", f"theme=dark; consistency_token={cookie}".encode()))
    token = presented_token(Headers(raw=raw))

    assert (format_lsn(token) if token is not None else None) == expected


def test_reads_take_turns_between_replicas_that_may_serve_them() -> None:
    """`choose` alone, on the state the monitor keeps (no server is asked)."""
    settings = Settings(
        database_url=normalize_database_url("postgresql://u@primary/app"),
        database_replica_urls=tuple(
            normalize_database_url(f"postgresql://u@{host}/app") for host in ("r1", "r2", "r3")
        ),
        db_replica_max_lag_ms=1000,
    )
    replicas = ReplicaSet.create(settings)
    now = time.monotonic()
    first, second, third = replicas.replicas
    for replica in replicas.replicas:
        replica.reachable, replica.as_of, replica.replayed = True, now, 100
    third.as_of = now - 5  # five seconds behind: no reads
    second.replayed = 50

    untokened = [replicas.choose(None) for _ in range(4)]
    tokened = [replicas.choose(80) for _ in range(2)]
    first.reachable = False
    after_failure = replicas.choose(80)

    assert untokened == [first, second, first, second]
    assert tokened == [first, first]
    assert after_failure is None  # only the primary has what the token needs
