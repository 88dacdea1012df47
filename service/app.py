"""The application factory: settings -> lifespan -> request context -> middleware -> routes."""

from __future__ import annotations

from functools import cache
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from service.config import Settings, load_settings
from service.lifespan import Lifespan
from service.metrics import metrics
from service.middleware import BearerAuthMiddleware, DBSessionMiddleware, RequestContextMiddleware
from service.openapi import openapi_document, operation
from service.problems import EXCEPTION_HANDLERS, ProblemResponses
from service.routes import all_routes
from service.routes import metrics as metrics_routes
from service.routing import MethodRoute

TITLE = "Conversation store"
VERSION = "0.1.0"


def _routes() -> list[BaseRoute]:
    return [*all_routes(), MethodRoute("/openapi.json", GET=read_openapi)]


@cache
def _document() -> dict[str, Any]:
    # Built on first use rather than at startup: routes never change in a process.
    return openapi_document(_routes(), title=TITLE, version=VERSION)


@operation("This document", response=None)
async def read_openapi(request: Request) -> Response:
    """The OpenAPI 3.1 description of every route, generated from the models."""
    return JSONResponse(_document())


def create_app(settings: Settings | None = None) -> ASGIApp:
    """Build the ASGI app; with no settings given, read them from the environment."""
    settings = settings if settings is not None else load_settings()
    # /metrics is an operator's endpoint, outside the API's OpenAPI document.
    extra_routes = metrics_routes.ROUTES if settings.metrics_enabled else []
    middleware = [Middleware(DBSessionMiddleware)]
    if settings.api_keys:  # open (the default): no layer at all, rather than one that passes
        middleware.insert(0, Middleware(BearerAuthMiddleware, api_keys=settings.api_keys))
    app = Routed(
        routes=[*_routes(), *extra_routes],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    context = RequestContextMiddleware(app, metrics=metrics() if settings.metrics_enabled else None)
    return Lifespan(context, settings=settings)


class Routed(Starlette):
    """Starlette with this service's own layers at both ends of its stack.

    No ServerErrorMiddleware on top: RequestContextMiddleware wraps this app and
    is the last resort already (a problem+json 500 with the request id), and the
    server answers 500 to whatever escapes that. `ProblemResponses` instead of
    ExceptionMiddleware under the middleware: the same handlers, for less per
    request.
    """

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = ProblemResponses(self.router, handlers=self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app
