"""Plain ASGI middleware: request context, bearer auth, and the per-request session.

Order, outermost first: RequestContextMiddleware -> BearerAuthMiddleware ->
DBSessionMiddleware -> Starlette's exception handling -> router. Each passes
anything that is not HTTP (lifespan included) straight through, and keeps
nothing per-request on `self`.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import anyio
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import ReadOnlySession
from service.errors import Unauthorized
from service.logs import REQUEST_ID
from service.problems import internal_error_response, render_service_error

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.access")

# Heroku's router passes on an incoming X-Request-ID of this shape, so we do too.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9+/=-]{20,200}")
SAFE_METHODS = frozenset({"GET", "HEAD"})


def is_open_path(path: str) -> bool:
    """Health checks stay reachable without a key: monitors and routers carry none."""
    return path == "/health" or path.startswith("/health/")


def with_state(scope: Scope, **values: object) -> Scope:
    """A copy of the scope whose `state` adds `values`; the lifespan's dict is shared."""
    return {**scope, "state": {**scope.get("state", {}), **values}}


class RequestContextMiddleware:
    """Request id, one access-log line per request, and the last-resort 500.

    Being the outermost of ours (only Starlette's own error safety net wraps
    it), it sees every response, so the request id lands in every response
    header, problem body and log line.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope = with_state(scope, request_id=request_id)
        started_at = time.perf_counter()
        status: int | None = None

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except ClientDisconnect:
            status = status or 499  # nginx's code for "client closed request"; nothing to send
        except Exception:
            if status is not None:
                raise  # the response is half sent; let the server cut the connection
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            await internal_error_response(request_id)(scope, receive, send_with_request_id)
        finally:
            access_logger.info(
                "%s %s %s %.1fms",
                scope["method"],
                scope["path"],
                status or "-",
                (time.perf_counter() - started_at) * 1000,
            )
            REQUEST_ID.reset(token)


class BearerAuthMiddleware:
    """Requires `Authorization: Bearer <key>` on every route but /health*, when keys are set."""

    def __init__(self, app: ASGIApp, *, api_keys: Sequence[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._is_known(token.strip().encode()):
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
    use, so requests that never touch the database (liveness) pay nothing for it."""

    def __init__(self, shared: dict[str, Any], *, open_session: Callable[[], AsyncSession]) -> None:
        super().__init__(shared)
        self._open_session = open_session

    def __missing__(self, key: str) -> Any:
        if key != "db":
            raise KeyError(key)
        session = self["db"] = self._open_session()
        return session


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

    The session is closed after the response has been sent, also when the
    handler raises or the client goes away; closing rolls back whatever the
    handler did not commit and returns the connection to the pool. The close
    is shielded so a cancelled request cannot leak its connection.

    GET and HEAD never write, so their session runs in autocommit: no
    BEGIN/ROLLBACK round trips, and a flush is refused (`ReadOnlySession`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        shared = scope["state"]
        sessionmaker = shared["sessionmaker"]
        if scope["method"] in SAFE_METHODS:
            open_session = partial(
                sessionmaker,
                bind=shared["autocommit_engine"],
                sync_session_class=ReadOnlySession,
            )
        else:
            open_session = sessionmaker
        state = RequestState(shared, open_session=open_session)
        failed = False
        try:
            await self.app({**scope, "state": state}, receive, send)
        except BaseException:
            failed = True
            raise
        finally:
            session = state.get("db")  # get() does not open one
            if session is not None:
                with anyio.CancelScope(shield=True):
                    await _release(session, failed=failed)
