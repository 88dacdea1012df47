"""The one place that renders errors: every error response is RFC 9457 problem+json."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    UNREACHABLE,
    ServiceError,
    ServiceUnavailable,
    from_database_error,
    is_transaction_conflict,
    sqlstate_of,
)
from service.metrics import record_unavailable

logger = logging.getLogger(__name__)
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class ProblemResponse(JSONResponse):
    media_type = "application/problem+json"


def problem_response(
    status: int,
    *,
    detail: str,
    request_id: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, object] | None = None,
) -> Response:
    """Build the problem+json body; `type` is about:blank so `title` is the status phrase."""
    body: dict[str, object] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "request_id": request_id,
        **(extra or {}),
    }
    return ProblemResponse(body, status_code=status, headers=headers)


def render_service_error(error: ServiceError, request_id: str) -> Response:
    if isinstance(error, ServiceUnavailable):
        record_unavailable(error.cause)
    return problem_response(
        error.status,
        detail=error.detail,
        request_id=request_id,
        headers=error.headers,
        extra=error.extra(),
    )


def internal_error_response(request_id: str) -> Response:
    """A 500 that says nothing about the cause: no traceback, SQL or secrets."""
    return problem_response(
        500, detail="the server failed to handle this request", request_id=request_id
    )


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


async def handle_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return render_service_error(exc, _request_id(request))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405 (with its Allow header)."""
    assert isinstance(exc, HTTPException)
    detail = {404: "no such resource", 405: f"{request.method} is not allowed here"}.get(
        exc.status_code, str(exc.detail)
    )
    return problem_response(
        exc.status_code,
        detail=detail,
        request_id=_request_id(request),
        headers=dict(exc.headers or {}),
    )


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """Outages, timeouts and constraint violations become 4xx/503; anything else is a bug."""
    error = from_database_error(exc)
    if error is None:
        raise exc
    if error.status >= 500 or is_transaction_conflict(exc):
        # The SQLSTATE tells an operator which fault it was (57014 a statement
        # timeout, 53300 too many connections, 08006 a lost connection, 40P01 a
        # deadlock that persisted through the retries...).
        logger.warning(
            "database %s: %s (SQLSTATE %s)",
            "unavailable" if error.status >= 500 else "conflict",
            type(exc).__name__,
            sqlstate_of(exc) or "none",
        )
    return render_service_error(error, _request_id(request))


EXCEPTION_HANDLERS = {
    ServiceError: handle_service_error,
    HTTPException: handle_http_exception,
    SQLAlchemyError: handle_database_error,
    **dict.fromkeys(UNREACHABLE, handle_database_error),
}


class ProblemResponses:
    """Answers what the router and the routes raise with the handler registered for
    the exception's class (`EXCEPTION_HANDLERS`), unless the response has started.

    Starlette's ExceptionMiddleware, cut to what this service uses (handlers by
    class, all async, HTTP only): it built a Request and two closures for every
    request, ~10,000 instructions, whether anything was raised or not. What no
    handler takes (or a handler re-raises) goes on up to RequestContextMiddleware.
    """

    def __init__(
        self, app: ASGIApp, *, handlers: Mapping[type[Exception], ExceptionHandler]
    ) -> None:
        self.app = app
        self.handlers = dict(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None or started:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None
