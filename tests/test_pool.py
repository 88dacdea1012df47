"""The pool hands connections to waiting requests in arrival order."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util.queue import Empty, Full

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


def test_returns_in_one_tick_go_to_waiters_instead_of_overflowing_the_queue() -> None:
    """The pool closes a returned connection when its queue is full (`Full`). A stock
    asyncio queue holds each returned item until its woken waiter runs, so three
    returns in one tick overflow a queue of two though three requests wait."""

    async def scenario() -> tuple[list[str | BaseException], list[str]]:
        queue: HandOffQueue[str] = HandOffQueue(maxsize=2)
        waiters = [asyncio.create_task(greenlet_spawn(queue.get, True, 5)) for _ in range(3)]
        for _ in range(10):  # let each waiter run up to its wait for an item
            await asyncio.sleep(0)
        overflowed = []
        for item in ("a", "b", "c"):
            try:
                queue.put_nowait(item)
            except Full:
                overflowed.append(item)
        served = await asyncio.gather(*waiters, return_exceptions=True)
        return served, overflowed

    served, overflowed = asyncio.run(scenario())

    assert overflowed == []
    assert served == ["a", "b", "c"]


def test_a_waiter_cancelled_as_it_is_handed_a_connection_gives_it_back() -> None:
    """The hand-off and the cancellation land in one loop tick, and an overflow
    connection fills the queue in that tick: the handed one must still come back."""

    async def scenario() -> list[str]:
        queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
        waiting = asyncio.create_task(greenlet_spawn(queue.get, True, 5))
        await asyncio.sleep(0)  # the task is now parked on its waiter
        queue.put_nowait("handed")  # resolves the waiter; the task has not run yet
        queue.put_nowait("overflow")  # nobody waits any more: it fills the queue
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return [queue.get_nowait(), queue.get_nowait()]

    assert sorted(asyncio.run(scenario())) == ["handed", "overflow"]


def test_a_waiter_whose_time_runs_out_as_it_is_handed_a_connection_keeps_it() -> None:
    async def scenario() -> tuple[str, list[str]]:
        queue: HandOffQueue[str] = HandOffQueue(maxsize=1)
        # A zero timeout fires in the next tick, after this coroutine's own wake-up.
        waiting = asyncio.create_task(greenlet_spawn(queue.get, True, 0))
        await asyncio.sleep(0)
        queue.put_nowait("handed")
        queue.put_nowait("overflow")
        got = await waiting
        return got, [queue.get_nowait()]

    assert asyncio.run(scenario()) == ("handed", ["overflow"])


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
                except sa_exc.TimeoutError:  # the pool's own "no connection in time"
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


def test_forty_requests_share_the_first_four_connections(database_url: str) -> None:
    """Under a burst, connections are handed on rather than closed and reopened, and
    every one is back in the pool afterwards."""
    settings = make_settings(database_url, db_pool_size=2, db_max_overflow=2, db_pool_timeout=30)
    opened = 0

    def count(*_: object) -> None:
        nonlocal opened
        opened += 1

    async def scenario() -> int:
        engine = create_engine(settings)
        event.listen(engine.sync_engine.pool, "connect", count)
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
    assert opened == 4  # DB_POOL_SIZE + DB_MAX_OVERFLOW, never closed and reopened
