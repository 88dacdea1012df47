"""Plain ASGI middleware: request context (and metrics), bearer auth, and the per-request session.

Order, outermost first: RequestContextMiddleware -> (Starlette) ->
BearerAuthMiddleware (only when API_KEYS is set) -> DBSessionMiddleware ->
`service.problems.ProblemResponses` -> router. Each passes anything that is not
HTTP (lifespan included) straight through, and keeps nothing per-request on `self`.
"""

from __future__ import annotations

import hmac
import logging
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import anyio
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.consistency import attach_token, presented_token, write_position
from service.db import ReadOnlySession, Replica, ReplicaSet
from service.errors import UNREACHABLE, Unauthorized
from service.inputs import bearer_token
from service.logs import REQUEST_ID
from service.metrics import Metrics
from service.problems import internal_error_response, render_service_error
from service.routes.health import LIVE_BODY, LIVE_HEADERS, LIVE_PATH

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.access")

# Heroku's router passes on an incoming X-Request-ID of this shape, so we do too.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9+/=-]{20,200}")
SAFE_METHODS = frozenset({"GET", "HEAD"})


def is_open_path(path: str) -> bool:
    """Health checks stay reachable without a key: monitors and routers carry none."""
    return path == "/health" or path.startswith("/health/")


def new_request_id() -> str:
    """32 random hex characters. A request id only has to be unique, not secret (a
    client may send its own), so it comes from `random` rather than `uuid.uuid4()`,
    whose system call and object cost a fifth of a liveness answer."""
    return random.randbytes(16).hex()  # noqa: S311 (not a secret, see above)


def raw_path(scope: Scope) -> str:
    """The path as the client sent it, still percent-encoded: a decoded `%0A` would
    start a new line in the log (the formatter escapes what is left)."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if raw else scope["path"]


def with_state(scope: Scope, **values: object) -> Scope:
    """A copy of the scope whose `state` adds `values`; the lifespan's dict is shared."""
    return {**scope, "state": {**scope.get("state", {}), **values}}


class RequestContextMiddleware:
    """Request id, one access-log line per request, the last-resort 500, and the
    request metrics (when given `metrics`).

    Being the outermost layer under the lifespan (`service.app` wraps the
    Starlette app in it), it sees every response, so the request id lands in
    every response header, problem body and log line, and every response is
    counted. (The metrics live here rather than in a layer of their own, which
    measured about 1.5 µs a request more, a third of the whole cost.)

    It also answers GET and HEAD /health/live itself, with the route's own bytes,
    logged and counted like any request: liveness proves the event loop answers,
    the platform polls it all day, and it must not depend on the router or the
    database; skipping the layers below cut its cost to under half.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _request_id_header(scope)
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else new_request_id()
        if scope["path"] == LIVE_PATH and scope["method"] in SAFE_METHODS:
            await self._answer_liveness(scope, send, request_id)
            return
        token = REQUEST_ID.set(request_id)
        scope = with_state(scope, request_id=request_id)
        metrics = self.metrics
        if metrics is not None:
            metrics.request_started()
        started_at = time.perf_counter()
        status: int | None = None

        request_id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list, as MutableHeaders would make, without building one.
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except ClientDisconnect:
            status = status or 499  # nginx's code for "client closed request"; nothing to send
        except Exception:
            if status is not None:
                raise  # the response is half sent; let the server cut the connection
            logger.exception("unhandled error in %s %s", scope["method"], raw_path(scope))
            await internal_error_response(request_id)(scope, receive, send_with_request_id)
        finally:
            seconds = time.perf_counter() - started_at
            _log_access(scope, status, seconds)
            if metrics is not None:
                # The router leaves the route it chose (even for a 405) in the scope.
                route = getattr(scope.get("route"), "path_format", None)
                metrics.request_done(
                    method=scope["method"], route=route, status=status, seconds=seconds
                )
            REQUEST_ID.reset(token)

    async def _answer_liveness(self, scope: Scope, send: Send, request_id: str) -> None:
        """The liveness route's own answer, sent without the layers below this one:
        it proves the event loop answers, the platform polls it all day, and it must
        not depend on the router or the database (see service.routes.health)."""
        # Not in http_requests_in_flight: it only awaits `send`, which suspends under
        # the server's backpressure alone, so no scrape could run while it is in
        # flight; the gauge's inc and dec cost a seventh of the answer for nothing.
        started_at = time.perf_counter()
        headers = [*LIVE_HEADERS, (b"x-request-id", request_id.encode("latin-1"))]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            body = LIVE_BODY if scope["method"] == "GET" else b""
            await send({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started_at
            if access_logger.isEnabledFor(logging.INFO):
                # Set only for the log line: setting a ContextVar costs ~4 % of the answer.
                token = REQUEST_ID.set(request_id)
                _log_access(scope, 200, seconds)
                REQUEST_ID.reset(token)
            if self.metrics is not None:
                self.metrics.count(
                    method=scope["method"], route=LIVE_PATH, status=200, seconds=seconds
                )


def _log_access(scope: Scope, status: int | None, seconds: float) -> None:
    """The request's access-log line (LOG_LEVEL=warning skips the work)."""
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info(
            "%s %s %s %.1fms", scope["method"], raw_path(scope), status or "-", seconds * 1000
        )


def _request_id_header(scope: Scope) -> str:
    """The first X-Request-ID header, or "" (what `Headers.get` gives, without
    building a Headers object for every request)."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":  # ASGI servers send header names in lower case
            return value.decode("latin-1")
    return ""


class BearerAuthMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but /health*, when keys are set."""

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope))
        if token is not None and self._is_known(token.encode()):
            await self.app(scope, receive, send)
            return
        error = Unauthorized("a valid bearer token is required in the Authorization header")
        await render_service_error(error, scope["state"]["request_id"])(scope, receive, send)

    def _is_known(self, token: bytes) -> bool:
        # Compare against every key, so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(token, key) for key in self.api_keys]
        return any(matches)


class RequestState(dict[str, Any]):
    """A request's copy of the lifespan state whose `db` session is opened on first
    use, so requests that never touch the database pay nothing for it: read-only
    and in autocommit on `read_from` for GET and HEAD, from the sessionmaker as it
    is otherwise. (Built by `request_state`: dict's own constructor, no Python one.)"""

    __slots__ = ("read_from",)
    read_from: AsyncEngine | None

    def __missing__(self, key: str) -> Any:
        if key != "db":
            raise KeyError(key)
        if self.read_from is None:
            session = self["sessionmaker"]()
        else:
            session = self["sessionmaker"](bind=self.read_from, sync_session_class=ReadOnlySession)
        self["db"] = session
        return session


def request_state(shared: dict[str, Any], *, read_from: AsyncEngine | None) -> RequestState:
    """A request's state; `read_from`: the engine a GET or HEAD reads from."""
    state = RequestState(shared)
    state.read_from = read_from
    return state


def _holds_anything(session: AsyncSession) -> bool:
    """Whether closing `session` would do anything: outside a transaction it holds no
    connection, and with no objects it has nothing to let go of."""
    return session.in_transaction() or bool(session.identity_map)


async def _release(session: AsyncSession, *, failed: bool) -> None:
    """Close the session; after an unexpected error or a cancellation the connection
    may be mid-statement (an autocommit read has no transaction to roll back), so
    it is invalidated rather than trusted back into the pool."""
    if failed:
        await session.invalidate()
    else:
        await session.close()


class DBSessionMiddleware:
    """Gives each HTTP request its own AsyncSession at `request.state.db`.

    The session is closed when the response starts, before a byte of the body
    goes out: handlers commit before they build their response, so by then the
    database work is done, and a client that reads slowly (or never) must not
    hold a pooled connection while the server waits to send it the body. It is
    closed again after the response, also when the handler raises or the client
    goes away (a streamed body may have used it again). Closing rolls back
    whatever the handler did not commit and returns the connection to the pool;
    it is shielded so a cancelled request cannot leak its connection.

    GET and HEAD never write, so their session runs in autocommit: no
    BEGIN/ROLLBACK round trips, and a flush is refused (`ReadOnlySession`).

    With replicas (`state["replicas"]`), GET and HEAD read from one that may
    serve them (`ReplicaSet.choose`, which honours a consistency token), and a
    read the replica fails is run again on the primary before anything has
    been sent; a successful write answers with a consistency token.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        shared = scope["state"]
        replicas: ReplicaSet | None = shared.get("replicas")
        if scope["method"] not in SAFE_METHODS:
            state = request_state(shared, read_from=None)
            if replicas is not None:
                send = _sending_token(send, state, replicas)
            await self._run(scope, receive, send, state)
            return
        replica = replicas.choose(presented_token(Headers(scope=scope))) if replicas else None
        if replica is None or not await self._read_from_replica(scope, receive, send, replica):
            state = request_state(shared, read_from=shared["autocommit_engine"])
            await self._run(scope, receive, send, state)

    async def _read_from_replica(
        self, scope: Scope, receive: Receive, send: Send, replica: Replica
    ) -> bool:
        """Serve the read from `replica`; False, with nothing sent, if the replica
        failed it (a 5xx or a database error), so the caller retries on the primary."""
        state = request_state(scope["state"], read_from=replica.autocommit_engine)
        started = failed = False

        async def send_unless_failed(message: Message) -> None:
            nonlocal started, failed
            if message["type"] == "http.response.start":
                failed = message["status"] >= 500 and "db" in state
                started = not failed
            if not failed:
                await send(message)

        try:
            await self._run(scope, receive, send_unless_failed, state)
        except (SQLAlchemyError, *UNREACHABLE) as exc:
            if started:
                raise
            failed = True
            replica.mark_down(f"a read failed: {type(exc).__name__}")
        else:
            if failed:
                replica.mark_down("a read failed with a server error")
        return not failed

    async def _run(self, scope: Scope, receive: Receive, send: Send, state: RequestState) -> None:
        failed = False

        async def send_after_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                session = state.get("db")
                if session is not None:
                    with anyio.CancelScope(shield=True):
                        await session.close()
            await send(message)

        # In place: the scope is this request's own, and the router's choice of
        # route, which it records there, stays visible to the layers above.
        scope["state"] = state
        try:
            await self.app(scope, receive, send_after_release)
        except BaseException:
            failed = True
            raise
        finally:
            session = state.get("db")  # get() does not open one
            # Mostly closed at the response's start already, and unused since.
            if session is not None and (failed or _holds_anything(session)):
                with anyio.CancelScope(shield=True):
                    await _release(session, failed=failed)


def _sending_token(send: Send, state: RequestState, replicas: ReplicaSet) -> Send:
    """`send` that adds the consistency token to a successful write's response."""

    async def send_with_token(message: Message) -> None:
        # A request that never used the database wrote nothing: no token.
        if (
            message["type"] == "http.response.start"
            and 200 <= message["status"] < 300
            and "db" in state
        ):
            lsn = await write_position(state["autocommit_engine"])
            attach_token(MutableHeaders(scope=message), lsn, max_lag=replicas.max_lag)
        await send(message)

    return send_with_token
