"""One route per path with a handler per method, so that a wrong method gets a
405 whose Allow header lists every method the path supports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.retries import run_with_retries

Handler = Callable[[Request], Awaitable[Response]]


class MethodRoute(Route):
    """`MethodRoute("/users", GET=list_users, POST=create_user)`; GET also serves HEAD."""

    def __init__(self, path: str, **handlers: Handler) -> None:
        self.handlers = dict(handlers)
        if "GET" in self.handlers:
            self.handlers.setdefault("HEAD", self.handlers["GET"])
        super().__init__(path, self._dispatch, methods=list(self.handlers))

    async def _dispatch(self, request: Request) -> Response:
        # Every route shares the retry of a transaction the database aborted (deadlock).
        return await run_with_retries(self.handlers[request.method], request)
