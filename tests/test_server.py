"""Against a real uvicorn process started from the Procfile's web command."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url as sqlalchemy_url

from service.server import listen
from tests.factories import user_body
from tests.proxy import Mode, in_front_of
from tests.support import (
    execute,
    fetch_value,
    locked_table,
    running_service,
    wait_for_lock_waiters,
    wait_until,
)

pytestmark = pytest.mark.process


def test_procfile_web_serves_on_the_embedded_default(tmp_path: Path) -> None:
    """No DATABASE_URL at all: the SQLite default, created in the working directory."""
    with running_service({}, tmp_path=tmp_path) as service:
        created = httpx.post(f"{service.base_url}/users", json=user_body())
        read = httpx.get(f"{service.base_url}{created.headers['location']}")
        health = httpx.get(f"{service.base_url}/health")

    assert created.status_code == 201
    assert read.json() == created.json()
    assert health.status_code == 200
    assert health.headers["content-type"] == "application/health+json"
    assert health.headers["cache-control"] == "no-store"
    assert health.json()["status"] == "pass"
    assert (tmp_path / "service.db").exists()


def test_procfile_web_serves_on_the_database_given(database_url: str, tmp_path: Path) -> None:
    with running_service({"DATABASE_URL": database_url}, tmp_path=tmp_path) as service:
        created = httpx.post(f"{service.base_url}/users", json=user_body())
        read = httpx.get(f"{service.base_url}/users/{created.json()['uid']}")
        health = httpx.get(f"{service.base_url}/health").json()

    assert created.status_code == 201
    assert read.status_code == 200
    assert health["status"] == "pass"
    check = health["checks"]["database:responseTime"][0]
    assert check["status"] == "pass"
    assert check["observedUnit"] == "ms"
    assert health["pool"] == {"size": 5, "checked_out": 0, "overflow": 0}


def test_procfile_web_listens_on_every_interface(tmp_path: Path) -> None:
    """0.0.0.0, not 127.0.0.1: a platform's router reaches the dyno on an address of
    its own. 127.0.0.2 is loopback too, but only a wildcard bind accepts it."""
    with running_service({}, tmp_path=tmp_path) as service:
        port = service.base_url.rsplit(":", 1)[1]
        other_address = httpx.get(f"http://127.0.0.2:{port}/health/live", timeout=5)

    assert other_address.status_code == 200


def test_procfile_web_trusts_the_platforms_proxy_headers(tmp_path: Path) -> None:
    """The router ends TLS and says so in X-Forwarded-Proto; URLs the service builds
    (here the redirect for a trailing slash) must then be https."""
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    with running_service({}, tmp_path=tmp_path) as service:
        redirect = httpx.get(f"{service.base_url}/users/", headers=headers)
        plain = httpx.get(f"{service.base_url}/users/")

    assert redirect.status_code == 307
    assert redirect.headers["location"].startswith("https://")
    assert plain.headers["location"].startswith("http://")


def test_streamed_body_over_the_limit_is_413_without_reading_it_all(tmp_path: Path) -> None:
    with running_service({"MAX_BODY_BYTES": "1000"}, tmp_path=tmp_path) as service:
        port = int(service.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            sent = 0
            sock.setblocking(False)
            reply = b""
            deadline = time.monotonic() + 10
            while b"\r\n\r\n" not in reply and time.monotonic() < deadline and sent < 10_000_000:
                try:
                    sock.send(b"64\r\n" + b" " * 100 + b"\r\n")
                    sent += 100
                except BlockingIOError:
                    time.sleep(0.01)
                with contextlib.suppress(BlockingIOError):
                    reply += sock.recv(65536)

    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 1_000_000  # answered long before a megabyte: the body was not all read


def test_fifty_concurrent_creates_with_one_email(database_url: str, tmp_path: Path) -> None:
    body = user_body(email="race@example.com")

    async def race(base_url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            responses = await asyncio.gather(*(client.post("/users", json=body) for _ in range(50)))
        return [response.status_code for response in responses]

    with running_service({"DATABASE_URL": database_url}, tmp_path=tmp_path) as service:
        statuses = asyncio.run(race(service.base_url))
        listed = httpx.get(f"{service.base_url}/users").json()["items"]

    assert statuses.count(201) == 1
    assert statuses.count(409) == 49
    assert len(listed) == 1


@pytest.mark.postgres
def test_a_commit_that_fails_is_an_error_not_a_201(postgres_url: str, tmp_path: Path) -> None:
    """Make the email check happen at COMMIT (a deferred constraint), so the
    INSERT succeeds and only the commit fails: the client must not get a 201."""
    with running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service:
        asyncio.run(
            execute(
                postgres_url,
                "DROP INDEX uq_users_email_lower; DROP INDEX uq_users_email_key;"
                "ALTER TABLE users ADD CONSTRAINT uq_users_email_key UNIQUE (email_key)"
                " DEFERRABLE INITIALLY DEFERRED",
            )
        )
        first = httpx.post(f"{service.base_url}/users", json=user_body(email="d@example.com"))
        second = httpx.post(f"{service.base_url}/users", json=user_body(email="d@example.com"))
        count = asyncio.run(fetch_value(postgres_url, "SELECT count(*) FROM users"))

    assert first.status_code == 201
    assert second.status_code == 409
    assert second.headers["content-type"] == "application/problem+json"
    assert count == 1


@pytest.mark.postgres
def test_pool_exhausted_is_503_with_retry_after(postgres_url: str, tmp_path: Path) -> None:
    """One pooled connection, held by a request stuck behind a table lock."""
    env = {
        "DATABASE_URL": postgres_url,
        "DB_POOL_SIZE": "1",
        "DB_MAX_OVERFLOW": "0",
        "DB_POOL_TIMEOUT": "0.5",
    }

    async def scenario(base_url: str) -> tuple[httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with locked_table(postgres_url):
                stuck = asyncio.create_task(client.get("/users"))
                await wait_for_lock_waiters(postgres_url, 1)
                started = time.monotonic()
                refused = await client.get("/users")
                waited = time.monotonic() - started
            return await stuck, refused, waited

    with running_service(env, tmp_path=tmp_path) as service:
        stuck, refused, waited = asyncio.run(scenario(service.base_url))

    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert refused.headers["content-type"] == "application/problem+json"
    assert 0.4 < waited < 5
    assert stuck.status_code == 200


@pytest.mark.postgres
def test_database_outage_is_503_and_recovers_without_restart(
    postgres_url: str, tmp_path: Path
) -> None:
    with (
        in_front_of(postgres_url) as (proxy, through_proxy),
        running_service({"DATABASE_URL": through_proxy}, tmp_path=tmp_path) as service,
    ):
        base = service.base_url
        created = httpx.post(f"{base}/users", json=user_body())
        assert created.status_code == 201, created.text
        uid = created.json()["uid"]

        proxy.set_mode(Mode.REFUSE)
        down_read = httpx.get(f"{base}/users/{uid}", timeout=30)
        down_health = httpx.get(f"{base}/health", timeout=30)

        proxy.set_mode(Mode.PASS)
        wait_until(
            lambda: httpx.get(f"{base}/health", timeout=30).status_code == 200,
            timeout=15,
            what="recovery without a restart",
        )
        after = [httpx.get(f"{base}/users/{uid}", timeout=30).status_code for _ in range(10)]

    assert down_read.status_code == 503
    assert down_read.headers["retry-after"].isdigit()
    assert down_health.status_code == 503
    assert down_health.headers["retry-after"].isdigit()
    assert down_health.json()["status"] == "fail"
    assert after == [200] * 10  # no pooled connection stayed broken


@pytest.mark.postgres
def test_pooled_connections_the_server_ended_cost_no_request(
    postgres_url: str, tmp_path: Path
) -> None:
    """After a restart or failover every idle pooled connection is dead; each is
    found at checkout and replaced, so no request sees it."""
    env = {"DATABASE_URL": postgres_url, "DB_POOL_SIZE": "5"}
    with running_service(env, tmp_path=tmp_path) as service, httpx.Client() as client:
        base = service.base_url
        uid = client.post(f"{base}/users", json=user_body()).json()["uid"]

        async def fill_the_pool() -> None:
            async with httpx.AsyncClient() as concurrent:
                await asyncio.gather(*(concurrent.get(f"{base}/users/{uid}") for _ in range(20)))

        asyncio.run(fill_the_pool())
        database = sqlalchemy_url(postgres_url).database
        ended = asyncio.run(
            fetch_value(
                postgres_url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
            )
        )
        time.sleep(0.5)  # the server's goodbye reaches the idle sockets
        statuses = [client.get(f"{base}/users/{uid}").status_code for _ in range(40)]

    assert isinstance(ended, int) and ended >= 2
    assert statuses == [200] * 40


def test_accepted_connections_have_nagle_off() -> None:
    """uvicorn's own socket for several workers has proto 0, so asyncio skips
    TCP_NODELAY on accepted connections; ours is made so that they inherit it."""
    with listen(0) as server:
        server.listen()  # the server does this when it starts
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                assert accepted.proto == socket.IPPROTO_TCP
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_four_workers_answer_as_fast_as_one(tmp_path: Path) -> None:
    """Kept-alive requests must not wait on Nagle's algorithm (~40 ms each)."""

    def median_latency_ms(base_url: str) -> float:
        with httpx.Client(base_url=base_url) as client:
            for _ in range(5):
                client.get("/users")
            samples = []
            for _ in range(30):
                started = time.perf_counter()
                client.get("/users")
                samples.append((time.perf_counter() - started) * 1000)
        return statistics.median(samples)

    medians = {}
    for workers in ("1", "4"):
        with running_service({"WEB_CONCURRENCY": workers}, tmp_path=tmp_path) as service:
            medians[workers] = median_latency_ms(service.base_url)

    assert medians["4"] < medians["1"] + 20, medians


@pytest.mark.postgres
def test_an_unexpected_database_error_on_a_real_route_is_a_bare_500(
    postgres_url: str, tmp_path: Path
) -> None:
    """A trigger raises an SQLSTATE nothing maps (P0001): the client gets a generic
    problem with its request id, the log has the id, and neither leaks the SQL."""
    request_id = "unmapped-sqlstate-0123456789"
    with (
        running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service,
        httpx.Client(base_url=service.base_url, timeout=10) as client,
    ):
        user = client.post("/users", json=user_body())
        assert user.status_code == 201, user.text
        conversation = client.post(
            f"/users/{user.json()['uid']}/conversations", json={"title": "t"}
        )
        assert conversation.status_code == 201, conversation.text
        asyncio.run(
            execute(
                postgres_url,
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'trigger says no' USING ERRCODE = 'P0001'; END $$;"
                " CREATE TRIGGER refuse BEFORE INSERT ON messages"
                " FOR EACH ROW EXECUTE FUNCTION refuse()",
            )
        )
        response = client.post(
            f"/conversations/{conversation.json()['uid']}/messages",
            json={"prompt": "private prompt"},
            headers={"X-Request-ID": request_id},
        )
    log = service.log()

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == request_id
    body = response.json()
    assert body["status"] == 500
    assert body["request_id"] == request_id
    for leak in ("INSERT", "messages", "trigger says no", "P0001", "private prompt", "Traceback"):
        assert leak not in response.text, leak
    assert any(f"[{request_id}]" in line and " ERROR " in line for line in log.splitlines()), log


@pytest.mark.postgres
def test_a_worker_that_cannot_start_makes_the_parent_exit_non_zero(
    postgres_url: str, tmp_path: Path
) -> None:
    """The parent's own check passes, then the database goes away before the two
    workers reach it: they give up at the startup deadline, and so must the parent,
    with a status the platform reads as a crash (uvicorn's supervisor returns as
    after a SIGTERM)."""
    with (
        in_front_of(postgres_url) as (proxy, proxied_url),
        running_service(
            {"DATABASE_URL": proxied_url, "WEB_CONCURRENCY": "2"}, tmp_path=tmp_path, wait=False
        ) as service,
    ):
        wait_until(lambda: "listening on" in service.log(), timeout=30, what="the parent")
        proxy.set_mode(Mode.REFUSE)  # before the forked workers have connected
        exit_status = service.process.wait(timeout=60)

    assert exit_status != 0, service.log()
    assert "failed to start" in service.log()
