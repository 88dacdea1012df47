"""The ceiling for the service's `/health/live`: a bare Starlette app with that one
route, sending the same body and headers (media type, Cache-Control, a fresh
X-Request-ID) and doing nothing else.

    uvicorn --app-dir bench bare_app:app
"""

from __future__ import annotations

import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY = b'{"status":"pass"}'


async def read_liveness(request: Request) -> Response:
    headers = {"Cache-Control": "no-store", "X-Request-ID": uuid.uuid4().hex}
    return Response(BODY, headers=headers, media_type="application/health+json")


app = Starlette(routes=[Route("/health/live", read_liveness)])
