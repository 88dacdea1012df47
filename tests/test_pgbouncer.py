"""Behind a real PgBouncer in transaction mode: the service started from the
Procfile with several workers, under concurrent CRUD load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.factories import user_body
from tests.pgbouncer import PgBouncer, running_pgbouncer
from tests.support import (
    POSTGRES_ADMIN_URL,
    ServiceProcess,
    locked_table,
    running_service,
    wait_until_live,
)

pytestmark = [pytest.mark.postgres, pytest.mark.process]

POOL_SIZE = 5
ROUNDS = 40  # of 9 requests each: 360 requests
CONCURRENCY = 32
CONTROL_STARTUP_SECONDS = 40
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
)
# What each step of a round answers when all is well.
EXPECTED = {
    "create user": 201,
    "read user": 200,
    "patch user": 200,
    "create conversation": 201,
    "create message": 201,
    "list messages": 200,
    "list users": 200,
    "health": 200,
    "delete user": 204,
}


@pytest.fixture
def bouncer(postgres_url: str) -> Iterator[PgBouncer]:
    """A strict bouncer (no ignored startup parameters) with a 5-connection server pool."""
    with running_pgbouncer(postgres_url, pool_size=POOL_SIZE) as started:
        yield started


@dataclass
class Load:
    outcomes: list[tuple[str, int]]
    server_connections: list[int]  # pg_stat_activity samples taken during the load

    @property
    def unexpected(self) -> list[tuple[str, int]]:
        return [(step, status) for step, status in self.outcomes if status != EXPECTED[step]]


async def _round(client: httpx.AsyncClient, outcomes: list[tuple[str, int]]) -> None:
    """One user's life: create, read, change, converse, list, delete."""

    async def step(name: str, request: httpx.Request) -> httpx.Response:
        response = await client.send(request)
        outcomes.append((name, response.status_code))
        return response

    created = await step("create user", client.build_request("POST", "/users", json=user_body()))
    if created.status_code != 201:
        return
    user = f"/users/{created.json()['uid']}"
    await step("read user", client.build_request("GET", user))
    await step("patch user", client.build_request("PATCH", user, json={"first_name": "Grace"}))
    conversation = await step(
        "create conversation",
        client.build_request("POST", f"{user}/conversations", json={"title": "Engines"}),
    )
    if conversation.status_code == 201:
        messages = f"/conversations/{conversation.json()['uid']}/messages"
        body = {"prompt": "What can it compute?", "response": None}
        await step("create message", client.build_request("POST", messages, json=body))
        await step("list messages", client.build_request("GET", messages))
    await step("list users", client.build_request("GET", "/users", params={"limit": 20}))
    await step("health", client.build_request("GET", "/health"))
    await step("delete user", client.build_request("DELETE", user))


async def _sample_server_connections(database: str, stop: asyncio.Event) -> list[int]:
    """Server connections to `database`, counted from a direct connection to another one."""
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    samples: list[int] = []
    try:
        while not stop.is_set():
            samples.append(
                await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
                )
            )
            await asyncio.sleep(0.005)
    finally:
        await connection.close()
    return samples


async def _load(service: ServiceProcess, database_url: str, *, rounds: int = ROUNDS) -> Load:
    outcomes: list[tuple[str, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        _sample_server_connections(make_url(database_url).database or "", stop)
    )
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30, limits=limits) as client:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def gated() -> None:
            async with gate:
                await _round(client, outcomes)

        try:
            await asyncio.gather(*(gated() for _ in range(rounds)))
        finally:
            stop.set()
    return Load(outcomes, await sampler)


def test_pgbouncer_mode_under_load_has_no_errors_and_stays_in_the_pool(
    postgres_url: str, bouncer: PgBouncer, tmp_path: Path
) -> None:
    """4 workers x 10 client connections share the bouncer's 5 server connections,
    and no prepared statement is reused across transactions."""
    env = {
        "DATABASE_URL": bouncer.url_for(postgres_url),
        "DB_PGBOUNCER": "true",
        "WEB_CONCURRENCY": "4",
    }
    with running_service(env, tmp_path=tmp_path) as service:
        load = asyncio.run(_load(service, postgres_url))

    assert len(load.outcomes) == ROUNDS * len(EXPECTED)
    assert load.unexpected == [], service.log()[-3000:]
    assert 1 <= max(load.server_connections) <= POOL_SIZE
    assert "prepared statement" not in service.log()


def test_without_pgbouncer_mode_the_same_load_fails(postgres_url: str, tmp_path: Path) -> None:
    """The control: the same load with DB_PGBOUNCER=false must break, or the test
    above proves nothing. This bouncer lets statement_timeout through at connect,
    so the failure seen is the prepared statements, not the login."""
    with running_pgbouncer(
        postgres_url, pool_size=POOL_SIZE, ignore_startup_parameters=["statement_timeout"]
    ) as lenient:
        env = {
            "DATABASE_URL": lenient.url_for(postgres_url),
            "DB_PGBOUNCER": "false",
            "WEB_CONCURRENCY": "4",
        }
        # It either refuses to start (the startup check itself trips over the
        # prepared statements, which is not worth retrying) or starts and fails
        # under load: both prove the flag is what makes the bouncer safe.
        with running_service(env, tmp_path=tmp_path, wait=False) as service:
            try:
                wait_until_live(service, timeout=CONTROL_STARTUP_SECONDS)
            except AssertionError:
                load = None
            else:
                load = asyncio.run(_load(service, postgres_url))

    assert "prepared statement" in service.log()
    if load is None:
        assert "set DB_PGBOUNCER=true" in service.log()  # the operator is told the fix
    else:
        assert [status for _, status in load.outcomes if status >= 500]


def test_the_bouncer_refuses_statement_timeout_at_connect(bouncer: PgBouncer) -> None:
    """Like a hosted PgBouncer, so the service passing through it proves it sends
    no startup parameter a bouncer rejects."""

    async def connect() -> None:
        connection = await asyncpg.connect(
            bouncer.url_for(POSTGRES_ADMIN_URL), server_settings={"statement_timeout": "500"}
        )
        await connection.close()

    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
        asyncio.run(connect())


def test_connection_pool_url_wins_and_turns_pgbouncer_mode_on(
    postgres_url: str, bouncer: PgBouncer, tmp_path: Path
) -> None:
    """A hosted PgBouncer attaches DATABASE_CONNECTION_POOL_URL beside the direct
    DATABASE_URL: the service must go through the bouncer, safely, without
    DB_PGBOUNCER being set, and say so once."""
    env = {
        "DATABASE_URL": postgres_url,
        "DATABASE_CONNECTION_POOL_URL": bouncer.url_for(postgres_url),
    }
    with running_service(env, tmp_path=tmp_path) as service:
        load = asyncio.run(_load(service, postgres_url, rounds=10))
    database = make_url(postgres_url).database

    assert load.unexpected == []
    pool_lines = [line for line in service.log().splitlines() if "CONNECTION_POOL_URL" in line]
    assert len(pool_lines) == 1, service.log()
    assert f":{bouncer.port}/" in pool_lines[0]
    assert "PgBouncer, transaction mode" in pool_lines[0]
    assert f"login attempt: db={database} " in bouncer.log()


def test_statement_timeout_behind_the_bouncer_is_a_503_not_a_hang(
    postgres_url: str, bouncer: PgBouncer, tmp_path: Path
) -> None:
    """The bouncer rejects statement_timeout at connect, so DB_STATEMENT_TIMEOUT_MS
    must still bound a query stuck behind a lock, cancel it on the server (freeing
    the bouncer's server connection), and leave the service working."""
    env = {
        "DATABASE_URL": bouncer.url_for(postgres_url),
        "DB_PGBOUNCER": "true",
        "DB_STATEMENT_TIMEOUT_MS": "500",
    }

    async def scenario(base_url: str) -> tuple[httpx.Response, float, int, httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with locked_table(postgres_url) as locker:
                started = time.monotonic()
                stuck = await client.get("/users")
                waited = time.monotonic() - started
                # The cancel reaches the server just after the 503: poll for it.
                give_up_at = time.monotonic() + 5
                while (waiting := await locker.fetchval(LOCK_WAITERS)) and (  # noqa: ASYNC110
                    time.monotonic() < give_up_at
                ):
                    await asyncio.sleep(0.05)
            after = await client.get("/users")
        return stuck, waited, waiting, after

    with running_service(env, tmp_path=tmp_path) as service:
        stuck, waited, waiting, after = asyncio.run(scenario(service.base_url))

    assert stuck.status_code == 503
    assert stuck.headers["content-type"] == "application/problem+json"
    assert stuck.headers["retry-after"].isdigit()
    assert 0.4 < waited < 5
    assert waiting == 0  # the query was cancelled on the server, not left behind
    assert after.status_code == 200
