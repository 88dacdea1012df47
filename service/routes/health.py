"""Health checks for the platform and monitors: /health (readiness) and /health/live.

Liveness is defined here once (its body, headers and OpenAPI entry), but a GET or
HEAD of /health/live is answered by `service.middleware.RequestContextMiddleware`
with the same bytes, ahead of Starlette, the router and the session middleware:
liveness proves that the event loop answers, the platform polls it all day, and it
must not depend on the router or the database. The route stays for the OpenAPI
document and for the 405 that other methods get.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Literal

import anyio
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from service.db import ReplicaSet, core, pool_status
from service.errors import RETRY_AFTER_SECONDS
from service.models import utc_now
from service.openapi import operation
from service.routing import MethodRoute

logger = logging.getLogger(__name__)
HEALTH_MEDIA_TYPE = "application/health+json"
# Short enough that a monitor sees "fail" quickly when the database stops answering.
HEALTH_TIMEOUT_SECONDS = 2.0
Status = Literal["pass", "fail"]


class ResponseTime(BaseModel):
    componentType: str = "datastore"
    status: Status
    observedValue: float
    observedUnit: Literal["ms"] = "ms"
    time: datetime


class PoolFigures(BaseModel):
    size: int
    checked_out: int
    overflow: int


class ReplicaCheck(BaseModel):
    """What the replica monitor last saw: "pass" serves reads, "warn" is further
    behind than DB_REPLICA_MAX_LAG_MS, "fail" is down (reads go to the primary)."""

    name: str
    status: Literal["pass", "warn", "fail"]
    lag_ms: int | None
    replayed: str | None
    error: str | None = None
    pool: PoolFigures


class Readiness(BaseModel):
    """draft-inadarei-api-health-check, plus the connection pools' figures and the
    replicas (none without DATABASE_REPLICA_URLS); a replica never fails readiness."""

    status: Status
    checks: dict[str, list[ResponseTime]] = Field(
        json_schema_extra={"required": ["database:responseTime"]}
    )
    pool: PoolFigures
    replicas: list[ReplicaCheck] = []


class Liveness(BaseModel):
    status: Literal["pass"]


NO_STORE = {"Cache-Control": "no-store"}
# A failing check says when to look again, as every other 503 does.
FAILING = {**NO_STORE, "Retry-After": str(RETRY_AFTER_SECONDS)}
LIVE_PATH = "/health/live"
LIVE_BODY = Liveness(status="pass").model_dump_json().encode()


async def _database_answers(engine: AsyncEngine) -> bool:
    """One round trip, outside any transaction: no BEGIN/ROLLBACK around it."""
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_SECONDS):
            await core.ping(engine)
    except Exception as exc:  # any failure to answer is a "fail", whatever its kind
        logger.warning("health check failed: %s", type(exc).__name__)
        return False
    return True


def _replica_checks(replicas: ReplicaSet | None) -> list[ReplicaCheck]:
    """From the monitor's memory: /health adds no round trip per replica."""
    if replicas is None:
        return []
    return [
        ReplicaCheck(**entry, pool=PoolFigures(**pool_status(replica.engine)))
        for replica, entry in zip(replicas.replicas, replicas.report(), strict=True)
    ]


@operation(
    "Readiness: one database round trip",
    response=Readiness,
    also=(503,),
    media_type=HEALTH_MEDIA_TYPE,
    public=True,
)
async def read_health(request: Request) -> Response:
    """200 and "pass" when the database answers in time, 503 and "fail" otherwise."""
    engine: AsyncEngine = request.state.autocommit_engine
    started = time.perf_counter()
    ok = await _database_answers(engine)
    check = ResponseTime(
        status="pass" if ok else "fail",
        observedValue=round((time.perf_counter() - started) * 1000, 3),
        time=utc_now(),
    )
    report = Readiness(
        status=check.status,
        checks={"database:responseTime": [check]},
        pool=PoolFigures(**pool_status(engine)),
        replicas=_replica_checks(request.state.replicas),
    )
    return Response(
        report.model_dump_json(),
        status_code=200 if ok else 503,
        media_type=HEALTH_MEDIA_TYPE,
        headers=NO_STORE if ok else FAILING,
    )


@operation(
    "Liveness: never touches the database",
    response=Liveness,
    media_type=HEALTH_MEDIA_TYPE,
    public=True,
)
async def read_liveness(request: Request) -> Response:
    """200 while the process can serve requests at all."""
    return _liveness()


def _liveness() -> Response:
    return Response(LIVE_BODY, media_type=HEALTH_MEDIA_TYPE, headers=NO_STORE)


# What the middleware sends for GET and HEAD, computed once from the route's answer.
LIVE_HEADERS = tuple(_liveness().raw_headers)


ROUTES = [
    MethodRoute("/health", GET=read_health),
    MethodRoute(LIVE_PATH, GET=read_liveness),
]
