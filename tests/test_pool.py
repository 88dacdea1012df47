"""The pool hands connections to waiting requests in arrival order."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.queue import Empty

from service.config import Settings
from service.db import create_engine
from service.db.pool import HandOffQueue
from tests.conftest import make_settings


def test_a_returned_connection_goes_to_the_oldest_waiter_not_a_newcomer() -> None:
    async def scenario() -> list[str]:
        queue: HandOffQueue[str] = HandOffQueue(maxsize=2)
        served: list[str] = []

        async def wait_for_one(name: str) -> None:
            served.append(f"{name}:{await greenlet_spawn(queue.get, True, 5)}")

        first = asyncio.create_task(wait_for_one("first"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(wait_for_one("second"))
        await asyncio.sleep(0.01)

        queue.put_nowait("a")
        with pytest.raises(Empty):
            queue.get_nowait()  # a newcomer finds nothing: "a" is already first's
        queue.put_nowait("b")
        await asyncio.gather(first, second)
        return served

    assert asyncio.run(scenario()) == ["first:a", "second:b"]


def test_a_waiter_that_times_out_loses_nothing(database_url: str) -> None:
    """Giving up (DB_POOL_TIMEOUT) must not swallow a connection handed over at that moment."""
    settings: Settings = make_settings(
        database_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout=0.05
    )

    async def scenario() -> tuple[int, int]:
        engine = create_engine(settings)
        try:
            timeouts = 0

            async def impatient() -> None:
                nonlocal timeouts
                try:
                    async with engine.connect() as connection:
                        await connection.exec_driver_sql("SELECT 1")
                        await asyncio.sleep(0.04)
                except Exception:
                    timeouts += 1

            started = time.monotonic()
            await asyncio.gather(*(impatient() for _ in range(30)))
            assert time.monotonic() - started < 10
            return timeouts, engine.pool.checkedout()  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    timeouts, checked_out = asyncio.run(scenario())

    assert timeouts > 0  # the scenario really did make some give up
    assert checked_out == 0


def test_overflow_connections_go_to_waiters_before_being_closed(database_url: str) -> None:
    settings = make_settings(database_url, db_pool_size=2, db_max_overflow=2, db_pool_timeout=30)

    async def scenario() -> int:
        engine = create_engine(settings)
        try:

            async def request() -> None:
                async with engine.connect() as connection:
                    await connection.exec_driver_sql("SELECT 1")
                    await asyncio.sleep(0.01)

            await asyncio.gather(*(request() for _ in range(40)))
            return engine.pool.checkedout()  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == 0
