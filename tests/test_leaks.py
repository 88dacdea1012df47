"""No request path leaks a pooled connection: after ~2,000 mixed requests against the
real `web:` process (successes, every 4xx, handler errors, clients that vanish
mid-request, 32 at a time) PostgreSQL sees no transaction left open and no more
connections than the pools allow, and every worker's pool is back to 0 checked out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.factories import user_body
from tests.support import encode_cursor, running_service

pytestmark = [pytest.mark.postgres, pytest.mark.process]

WORKERS, POOL_SIZE, MAX_OVERFLOW = 2, 3, 2
CONNECTION_BUDGET = WORKERS * (POOL_SIZE + MAX_OVERFLOW)
MAX_BODY_BYTES = 16_384
STATEMENT_TIMEOUT_MS = 1000
CONCURRENCY = 32
SCENARIOS = 64  # each one ~31 requests
# Our own connections to PostgreSQL (monitor, lock holder) carry this name, so the
# figures below count only the service's.
OURS = "leak-test"
SERVICE_CONNECTIONS = f"""
    SELECT state, count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND application_name <> '{OURS}'
      AND backend_type = 'client backend'
    GROUP BY state
"""
JSON = {"Content-Type": "application/json"}
GC_RESCUE = "The garbage collector is trying to clean up non-checked-in connection"


@dataclass
class Tally:
    """Every request sent and what came back, plus the most connections seen."""

    statuses: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    max_connections: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.dropped.values())


async def _connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        database_url, timeout=5, server_settings={"application_name": OURS}
    )


async def _service_connections(monitor: asyncpg.Connection) -> dict[str | None, int]:
    return {row["state"]: row["count"] for row in await monitor.fetch(SERVICE_CONNECTIONS)}


@asynccontextmanager
async def _watching(database_url: str, tally: Tally) -> AsyncIterator[asyncpg.Connection]:
    """Samples the service's connection count every 20 ms while the load runs."""
    monitor = await _connect(database_url)
    sampler = await _connect(database_url)

    async def sample() -> None:
        while True:
            counts = await _service_connections(sampler)
            tally.max_connections = max(tally.max_connections, sum(counts.values()))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(sample())
    try:
        yield monitor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sampler.close()
        await monitor.close()


class Client:
    """An httpx client that checks every status against the one expected."""

    def __init__(self, http: httpx.AsyncClient, tally: Tally) -> None:
        self.http = http
        self.tally = tally

    async def expect(
        self, status: int | set[int], method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        response = await self.http.request(method, url, **kwargs)
        self.tally.statuses[response.status_code] += 1
        if response.status_code not in (status if isinstance(status, set) else {status}):
            self.tally.unexpected.append(
                f"{method} {url}: {response.status_code}, expected {status}: {response.text[:200]}"
            )
        return response


async def _scenario(client: Client, n: int) -> None:
    """One user's life, with a wrong turn at every error the contract lists."""
    body = user_body(username=f"user{n}")
    created = await client.expect(201, "POST", "/users", json=body)
    if created.status_code != 201:
        return
    uid, etag = created.json()["uid"], created.headers["etag"]
    await client.expect(200, "GET", f"/users/{uid}")
    await client.expect(200, "HEAD", f"/users/{uid}")
    await client.expect(200, "GET", "/users", params={"limit": 5})
    await client.expect(409, "POST", "/users", json={**body, "email": body["email"].upper()})
    await client.expect(
        412, "PATCH", f"/users/{uid}", json={"role": "admin"}, headers={"If-Match": '"0"'}
    )
    patched = await client.expect(
        200, "PATCH", f"/users/{uid}", json={"is_verified": True}, headers={"If-Match": etag}
    )
    conversation = await client.expect(
        201, "POST", f"/users/{uid}/conversations", json={"title": "t"}
    )
    cid = conversation.json()["uid"]
    messages = [
        await client.expect(201, "POST", f"/conversations/{cid}/messages", json={"prompt": f"p{i}"})
        for i in range(3)
    ]
    mid = messages[0].json()["uid"]
    page = await client.expect(200, "GET", f"/conversations/{cid}/messages", params={"limit": 2})
    cursor = page.json()["next_cursor"]
    await client.expect(200, "GET", f"/conversations/{cid}/messages", params={"cursor": cursor})
    await client.expect(200, "GET", f"/users/{uid}/conversations")
    await client.expect(200, "PATCH", f"/messages/{mid}", json={"response": "r"})
    await client.expect(422, "PATCH", f"/messages/{mid}", json={"prompt": None, "response": None})
    await client.expect(200, "PATCH", f"/conversations/{cid}", json={"title": "u"})
    await client.expect(400, "POST", "/users", content=b'{"username": ', headers=JSON)
    await client.expect(400, "POST", f"/users/{uid}/conversations", content=b"[]", headers=JSON)
    await client.expect(415, "POST", "/users", content=b"x", headers={"Content-Type": "text/plain"})
    big = json.dumps({"title": "x" * MAX_BODY_BYTES}).encode()
    await client.expect(413, "POST", f"/users/{uid}/conversations", content=big, headers=JSON)
    await client.expect(422, "POST", "/users", json={**body, "uid": str(uuid.uuid4())})
    await client.expect(422, "GET", "/users", params={"limit": 0})
    await client.expect(422, "GET", "/users", params={"cursor": "not-a-cursor"})
    await client.expect(404, "GET", f"/users/{uuid.uuid4()}")
    await client.expect(404, "POST", f"/users/{uuid.uuid4()}/conversations", json={"title": "t"})
    await client.expect(404, "GET", "/users/not-a-uuid")
    await client.expect(405, "PUT", f"/users/{uid}", json={})
    await client.expect(204, "DELETE", f"/messages/{mid}")
    if n % 2:  # keep half of the users, so lists have rows to walk
        await client.expect(204, "DELETE", f"/conversations/{cid}")
        await client.expect(404, "GET", f"/conversations/{cid}")
        await client.expect(
            204, "DELETE", f"/users/{uid}", headers={"If-Match": patched.headers["etag"]}
        )


async def _concurrent_load(base_url: str, tally: Tally) -> None:
    """SCENARIOS users' lives, CONCURRENCY requests in flight at a time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(SCENARIOS):
        queue.put_nowait(n)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=15) as http:
        client = Client(http, tally)

        async def worker() -> None:
            while not queue.empty():
                await _scenario(client, queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def _cursor(*, at: str | None = None, uid: object = None) -> str:
    """A cursor of the service's shape, with any time and uid in it."""
    return encode_cursor(
        [at or datetime.now(UTC).isoformat(), uuid.uuid4().hex if uid is None else uid]
    )


async def _handler_errors(base_url: str, database_url: str, tally: Tally) -> None:
    """Inputs that once raised through the session middleware as 500s (a body nested
    past json's recursion limit, a limit of thousands of digits, a malformed cursor)
    and now are clean 4xx; and a row locked elsewhere outlives the statement
    timeout, so each PATCH ends mid-transaction in a database error (a 503)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as http:
        client = Client(http, tally)
        created = await client.expect(201, "POST", "/users", json=user_body())
        deep = b"[" * 5000 + b"]" * 5000  # under MAX_BODY_BYTES, past json's recursion limit
        unhandled = [
            client.expect(400, "POST", "/users", content=deep, headers=JSON),
            client.expect(422, "GET", "/users", params={"limit": "9" * 5000}),
            client.expect(422, "GET", "/users", params={"cursor": _cursor(uid=5)}),
        ]
        await asyncio.gather(*unhandled)
        if created.status_code != 201:
            return
        uid = created.json()["uid"]
        locker = await _connect(database_url)
        try:
            async with locker.transaction():
                await locker.execute(
                    "SELECT 1 FROM users WHERE uid = $1 FOR UPDATE", uuid.UUID(uid)
                )
                await asyncio.gather(
                    *(
                        client.expect(503, "PATCH", f"/users/{uid}", json={"first_name": "L"})
                        for _ in range(6)
                    )
                )
        finally:
            await locker.close()


async def _raw(base_url: str, data: bytes, *, hold: float = 0.0, reset: bool = False) -> None:
    """Send `data` on a fresh socket, wait `hold` seconds, and go away unanswered
    (with a FIN, or with an RST when `reset`)."""
    address = urlsplit(base_url)
    _, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(hold)
    if reset:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def _request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _disconnects(base_url: str, database_url: str, tally: Tally) -> None:
    """Clients that drop the socket mid-body, right after a full request, or while
    a slow list (its table locked elsewhere) still holds a pooled connection."""
    body = json.dumps(user_body()).encode()
    partial = _request(
        "POST", "/users", body[:20], **{"Content-Type": "application/json", "Content-Length": "400"}
    )
    chunked = _request(
        "POST",
        "/users",
        b"40\r\n" + body[:20],
        **{"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    full = _request(
        "POST",
        "/users",
        body,
        **{"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    listing = _request("GET", "/users?limit=200")
    kinds: dict[str, Callable[[int], Awaitable[None]]] = {
        "partial body": lambda i: _raw(base_url, partial, hold=0.05, reset=i % 2 == 0),
        "partial chunked body": lambda i: _raw(base_url, chunked, hold=0.05, reset=i % 2 == 0),
        "partial headers": lambda i: _raw(base_url, listing[:30], hold=0.05),
        "full request, unread": lambda i: _raw(
            base_url, full.replace(b"user-", f"u{i}-".encode()), reset=i % 2 == 0
        ),
        "list, unread": lambda i: _raw(base_url, listing, reset=i % 2 == 0),
    }
    for kind, drop in kinds.items():
        await asyncio.gather(*(drop(i) for i in range(20)))
        tally.dropped[kind] += 20
    # A list blocked behind a table lock holds its pooled connection when the client
    # leaves; the lock goes before (then after) the statement timeout ends the wait.
    for lock_seconds, kind in ((0.6, "slow list, done after"), (1.6, "slow list, timed out after")):
        locker = await _connect(database_url)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                drops = asyncio.gather(
                    *(_raw(base_url, listing, hold=0.3, reset=i % 2 == 0) for i in range(6))
                )
                await asyncio.sleep(lock_seconds)
                await drops
        finally:
            await locker.close()
        tally.dropped[kind] += 6


async def _wait_until_idle(
    monitor: asyncpg.Connection, *, within: float = 5
) -> dict[str | None, int]:
    """The service's connections by state, once none is busy or mid-transaction."""
    give_up_at = time.monotonic() + within
    while True:
        counts = await _service_connections(monitor)
        if set(counts) <= {"idle"} or time.monotonic() > give_up_at:
            return counts
        await asyncio.sleep(0.1)


async def _pool_figures(base_url: str, tally: Tally, times: int) -> list[dict[str, int]]:
    """/health's pool figures, each on a fresh connection, so that every worker answers
    some (each has its own pool); sequential, so no health check counts another."""
    figures = []
    for _ in range(times):
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
            response = await Client(http, tally).expect(200, "GET", "/health")
            figures.append(response.json()["pool"])
    return figures


LoadPhase = Callable[[str, str, Tally], Awaitable[None]]
PHASES: dict[str, LoadPhase] = {
    "concurrent load": lambda base_url, _, tally: _concurrent_load(base_url, tally),
    "handler errors": _handler_errors,
    "disconnects": _disconnects,
}
PHASE_SECONDS = 30


def test_no_request_path_leaks_a_connection(postgres_url: str, tmp_path: Path) -> None:
    """Every kind of request, then: no open transactions, pools within budget, all returned."""
    env = {
        "DATABASE_URL": postgres_url,
        "WEB_CONCURRENCY": str(WORKERS),
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": str(MAX_OVERFLOW),
        "DB_STATEMENT_TIMEOUT_MS": str(STATEMENT_TIMEOUT_MS),
        "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "LOG_LEVEL": "warning",
    }
    tally = Tally()
    after: dict[str, dict[str | None, int]] = {}  # the service's connections by state

    async def run(base_url: str) -> list[dict[str, int]]:
        async with _watching(postgres_url, tally) as monitor:
            for name, phase in PHASES.items():
                async with asyncio.timeout(PHASE_SECONDS):  # a starved pool fails, not hangs
                    await phase(base_url, postgres_url, tally)
                after[name] = await _wait_until_idle(monitor)
        return await _pool_figures(base_url, tally, times=20)

    started = time.monotonic()
    with running_service(env, tmp_path=tmp_path) as service:
        pools = asyncio.run(run(service.base_url))
        assert service.process.poll() is None, service.log()
        log = service.log()
    print(
        f"sent {tally.sent} requests ({dict(tally.statuses)}, dropped {dict(tally.dropped)}) "
        f"in {time.monotonic() - started:.1f} s; at most {tally.max_connections} connections; "
        f"after each phase: {after}; pools: {pools[0]}"
    )
    # SQLAlchemy's last resort for a session nobody closed: the garbage collector
    # terminates its connection, so the pool heals, but the leak was real.
    assert GC_RESCUE not in log, "a pooled connection was left for the garbage collector"
    for name, states in after.items():
        assert set(states) <= {"idle"}, f"after {name}, connections busy or mid-transaction"
        assert sum(states.values()) <= CONNECTION_BUDGET
    assert all(pool["checked_out"] == 0 for pool in pools), pools
    assert tally.max_connections <= CONNECTION_BUDGET
    assert tally.unexpected == []
    assert tally.sent >= 2000


def test_a_read_that_fails_mid_query_leaves_no_transaction(
    postgres_url: str, tmp_path: Path
) -> None:
    """A read whose query fails half-sent must hand back a clean connection: no
    transaction left open on the server, no lock that blocks a migration."""
    env = {
        "DATABASE_URL": postgres_url,
        "DB_POOL_SIZE": "2",
        "DB_MAX_OVERFLOW": "0",
        "LOG_LEVEL": "critical",
    }
    params = {"cursor": _cursor(at="0001-01-01T00:00:00+14:00")}

    async def inspect() -> tuple[dict[str | None, int], bool]:
        monitor = await _connect(postgres_url)
        try:
            states = await _wait_until_idle(monitor, within=3)
            await monitor.execute("SET lock_timeout = '2s'")
            try:
                async with monitor.transaction():
                    await monitor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            except asyncpg.LockNotAvailableError:
                return states, False
            return states, True
        finally:
            await monitor.close()

    with running_service(env, tmp_path=tmp_path) as service:
        with httpx.Client(base_url=service.base_url, timeout=10) as client:
            statuses = {client.get("/users", params=params).status_code for _ in range(4)}
        states, lockable = asyncio.run(inspect())
    assert statuses == {422}
    assert set(states) <= {"idle"}, f"connections busy or mid-transaction: {states}"
    assert lockable, "a pooled connection still holds a lock on users"
