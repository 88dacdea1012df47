"""One route per path with a handler per method, so that a wrong method gets a
405 whose Allow header lists every method the path supports; a POST with an
Idempotency-Key goes through service.idempotency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from service import idempotency
from service.retries import run_with_retries

Handler = Callable[[Request], Awaitable[Response]]


class MethodRoute(Route):
    """`MethodRoute("/users", GET=list_users, POST=create_user)`; GET also serves HEAD."""

    def __init__(self, path: str, **handlers: Handler) -> None:
        self.handlers = dict(handlers)
        if "GET" in self.handlers:
            self.handlers.setdefault("HEAD", self.handlers["GET"])
        super().__init__(path, self._dispatch, methods=list(self.handlers))
        # Straight to the handler: an error it raises reaches Starlette's
        # ExceptionMiddleware, which holds the same handlers, rather than a second
        # copy of that layer that Starlette would wrap around every route.
        self.app = self._serve
        self.static_prefix = path.split("{", 1)[0]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """Starlette's match, after a cheap test: the router asks every route in turn,
        and a path that does not start with this route's literal part cannot match
        its regex (Starlette's miss costs ~4,700 instructions, a tenth of a liveness
        answer, and a request to the last route paid ten). A root_path takes the
        long way, since the path then starts with it."""
        if scope["path"].startswith(self.static_prefix) or scope.get("root_path"):
            return super().matches(scope)
        return Match.NONE, {}

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._dispatch(Request(scope, receive, send))
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        handler = self.handlers[request.method]
        if request.method == "POST" and idempotency.HEADER in request.headers:
            # The claim is part of the transaction, so a retry claims again too.
            handler = partial(idempotency.run, handler=handler)
        # Every route shares the retry of a transaction the database aborted (deadlock).
        return await run_with_retries(handler, request)
