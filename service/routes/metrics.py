"""GET /metrics: Prometheus' text format, summed over every worker of the dyno."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from service.metrics import metrics
from service.routing import MethodRoute


async def read_metrics(request: Request) -> Response:
    """Every metric; never touches the database, so it answers while that is down."""
    # With several workers this reads every worker's files: off the event loop.
    body, content_type = await run_in_threadpool(
        metrics().exposition, request.headers.get("accept", "")
    )
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


ROUTES = [MethodRoute("/metrics", GET=read_metrics)]
