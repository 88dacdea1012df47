"""The session middleware, request context and auth, each on a tiny app built here."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from service.config import Settings
from service.db import autocommit, create_engine, create_sessionmaker, init_db
from service.lifespan import Lifespan
from service.middleware import DBSessionMiddleware, RequestContextMiddleware
from service.models import User, utc_now
from service.problems import EXCEPTION_HANDLERS
from tests.factories import user_body
from tests.support import free_port, running_service

Message = dict[str, Any]


class Probe:
    """Records the sessions handlers were given, to check on them afterwards."""

    def __init__(self) -> None:
        self.sessions: list[AsyncSession] = []
        self.states: list[dict[str, Any]] = []
        self.streaming = asyncio.Event()

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            await self._use(request)
            return JSONResponse({"ok": True})

        async def boom(request: Request) -> Response:
            await self._use(request)
            raise RuntimeError("password=hunter2 SELECT secret FROM vault")

        async def uncommitted(request: Request) -> Response:
            session = await self._use(request)
            now = utc_now()
            session.add(
                User(
                    username="ghost",
                    email="ghost@example.com",
                    first_name="G",
                    last_name="H",
                    created_at=now,
                    updated_at=now,
                )
            )
            await session.flush()
            return JSONResponse({"flushed": True})

        async def untouched(request: Request) -> Response:
            self.states.append(request.scope["state"])
            return JSONResponse({"db": "not used"})

        async def stream(request: Request) -> Response:
            session = await self._use(request)

            async def rows() -> AsyncIterator[bytes]:
                for n in range(10_000):
                    await session.exec(select(User).limit(1))
                    self.streaming.set()
                    yield f"{n}\n".encode()
                    await asyncio.sleep(0.01)

            return StreamingResponse(rows())

        async def slow(request: Request) -> Response:
            await self._use(request)
            await asyncio.sleep(0.5)
            return JSONResponse({"late": True})

        return Starlette(
            routes=[
                Route("/ok", ok),
                Route("/boom", boom),
                Route("/uncommitted", uncommitted, methods=["GET", "POST"]),
                Route("/untouched", untouched),
                Route("/stream", stream),
                Route("/slow", slow),
            ],
            middleware=[Middleware(RequestContextMiddleware), Middleware(DBSessionMiddleware)],
            exception_handlers=EXCEPTION_HANDLERS,
        )

    async def _use(self, request: Request) -> AsyncSession:
        session: AsyncSession = request.state.db
        self.sessions.append(session)
        await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return session


@asynccontextmanager
async def engine_for(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the running event loop (asyncpg connections belong to one loop)."""
    engine = create_engine(settings)
    await init_db(engine)
    try:
        yield engine
    finally:
        await engine.dispose()
        # Let the driver's own close tasks finish: asyncio.run cancels leftovers,
        # and aiosqlite's close, cancelled halfway, waits forever.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=5)


async def call(
    app: Starlette,
    engine: AsyncEngine,
    path: str,
    *,
    method: str = "GET",
    disconnect_after: float | None = None,
) -> list[Message]:
    """Drive the ASGI app by hand, as a server would, optionally with a client that
    goes away mid-request."""
    sent: list[Message] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("test", 1),
        "state": {
            "sessionmaker": create_sessionmaker(engine),
            "autocommit_engine": autocommit(engine),
        },
    }
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def assert_closed(probe: Probe, engine: AsyncEngine) -> None:
    assert probe.sessions, "the handler never ran"
    assert all(not session.in_transaction() for session in probe.sessions)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_session_closed_after_a_normal_response(settings: Settings) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/ok")
            assert sent[0]["status"] == 200
            assert_closed(probe, engine)

    asyncio.run(scenario())


def test_session_closed_when_the_handler_raises(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/boom")
            assert sent[0]["status"] == 500
            body = sent[1]["body"].decode()
            assert "hunter2" not in body and "SELECT" not in body and "Traceback" not in body
            assert_closed(probe, engine)

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert "RuntimeError" in caplog.text  # the operator still sees what happened


def test_uncommitted_work_is_rolled_back_at_close(settings: Settings) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/uncommitted", method="POST")
            assert sent[0]["status"] == 200
            assert_closed(probe, engine)
            async with AsyncSession(engine) as session:
                assert (await session.exec(select(User))).all() == []

    asyncio.run(scenario())


def test_a_get_handler_cannot_write(settings: Settings) -> None:
    """GET sessions run in autocommit, so a flush there is refused, not committed."""

    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/uncommitted", method="GET")
            assert sent[0]["status"] == 500
            assert_closed(probe, engine)
            async with AsyncSession(engine) as session:
                assert (await session.exec(select(User))).all() == []

    asyncio.run(scenario())


def test_no_session_is_opened_for_a_request_that_does_not_use_one(settings: Settings) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/untouched")
            assert sent[0]["status"] == 200
            assert probe.sessions == []
            assert "db" not in probe.states[0]

    asyncio.run(scenario())


def test_session_closed_when_a_streaming_client_disconnects(settings: Settings) -> None:
    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            sent = await call(probe.app(), engine, "/stream", disconnect_after=0.2)
            assert sent[0]["status"] == 200
            assert probe.streaming.is_set()
            assert len(sent) < 1_000  # the stream was cut short by the disconnect
            assert_closed(probe, engine)

    asyncio.run(scenario())


def test_session_closed_when_the_request_is_cancelled(settings: Settings) -> None:
    """Cancelled from outside (a server on disconnect or shutdown, a timeout): anyio's
    cancellation repeats at every await in the scope, so only a shielded close runs."""

    async def scenario() -> None:
        probe = Probe()
        async with engine_for(settings) as engine:
            with anyio.move_on_after(0.1) as scope:
                await call(probe.app(), engine, "/slow")
            assert scope.cancelled_caught
            assert_closed(probe, engine)

    asyncio.run(scenario())


def test_the_session_lives_on_a_per_request_copy_of_the_state(settings: Settings) -> None:
    probe = Probe()

    with TestClient(Lifespan(probe.app(), settings=settings)) as client:
        client.get("/ok")
        client.get("/ok")
        shared_state = client.app_state

    assert "sessionmaker" in shared_state
    assert "db" not in shared_state
    assert probe.sessions[0] is not probe.sessions[1]


# -- slow readers ---------------------------------------------------------------

STALLED_READERS = 4


@contextmanager
def stalled_readers(port: int, path: str) -> Iterator[list[socket.socket]]:
    """Clients that ask for `path` and never read a byte of the answer."""
    sockets = []
    try:
        for _ in range(STALLED_READERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
            sockets.append(sock)
        time.sleep(1)  # every one of them is now stuck mid-body
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@contextmanager
def serving(app: ASGIApp) -> Iterator[int]:
    """A real uvicorn server for `app` on a free port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_streamed_response_holds_no_connection_while_a_slow_client_reads(
    settings: Settings,
) -> None:
    """The handler is done with the database when its response starts; 4 clients
    that never read a 16 MB stream must not keep a pool of 2 from others."""

    async def download(request: Request) -> Response:
        await request.state.db.exec(text("SELECT 1"))

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(256):
                yield b"x" * 65536

        return StreamingResponse(chunks())

    async def ok(request: Request) -> Response:
        await request.state.db.exec(text("SELECT 1"))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/download", download), Route("/ok", ok)],
        middleware=[Middleware(RequestContextMiddleware), Middleware(DBSessionMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
    )
    small_pool = replace(settings, db_pool_size=2, db_max_overflow=0, db_pool_timeout=2.0)
    with serving(Lifespan(app, settings=small_pool)) as port, stalled_readers(port, "/download"):
        statuses = [
            httpx.get(f"http://127.0.0.1:{port}/ok", timeout=30).status_code for _ in range(5)
        ]

    assert statuses == [200] * 5


def test_clients_that_never_read_a_large_page_do_not_starve_the_pool(
    database_url: str, tmp_path: Path
) -> None:
    """The real process, a pool of 2, and 4 clients stalled on ~1 MiB pages."""
    env = {"DATABASE_URL": database_url, "DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "0"}
    with running_service({**env, "DB_POOL_TIMEOUT": "2"}, tmp_path=tmp_path) as service:
        base = service.base_url
        user = httpx.post(f"{base}/users", json=user_body()).json()
        conversation = httpx.post(
            f"{base}/users/{user['uid']}/conversations", json={"title": "big"}
        ).json()
        path = f"/conversations/{conversation['uid']}/messages"
        for _ in range(12):
            body = {"prompt": "p" * 100_000, "response": "r" * 100_000}
            assert httpx.post(f"{base}{path}", json=body).status_code == 201
        port = int(base.rsplit(":", 1)[1])
        with stalled_readers(port, f"{path}?limit=200"):
            statuses = [
                httpx.get(f"{base}/users/{user['uid']}", timeout=30).status_code for _ in range(5)
            ]

    assert statuses == [200] * 5
