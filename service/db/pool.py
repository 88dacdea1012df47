"""A connection pool that serves waiting requests in arrival order.

SQLAlchemy's asyncio pool lets a newly arrived request take a returned
connection ahead of requests already waiting, and sends a woken waiter that
lost that race to the back of the line; it also closes a returned connection
when the pool is full even though requests are waiting for one. Under load
that starves some requests until DB_POOL_TIMEOUT (a 503) while churning
connections. Here a returned connection goes straight to the oldest waiter.

This plugs into `QueuePool`'s queue hook (`_queue_class`), which is private
SQLAlchemy API: pyproject pins SQLAlchemy below 2.2 for that reason.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Protocol, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, Pool, QueuePool
from sqlalchemy.util import await_
from sqlalchemy.util.queue import Empty, Full, QueueCommon

ItemT = TypeVar("ItemT")


class HandOffQueue(QueueCommon[ItemT]):
    """FIFO hand-off: a put goes to the longest waiter; items only rest in the
    queue when nobody waits, so an arrival can never overtake a waiter."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        self.maxsize = maxsize
        self.use_lifo = use_lifo
        self._items: deque[ItemT] = deque()
        self._waiters: deque[asyncio.Future[ItemT]] = deque()

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def qsize(self) -> int:
        return len(self._items)

    def put_nowait(self, item: ItemT) -> None:
        if not self._hand_to_waiter(item):
            if self.full():
                raise Full()
            self._items.append(item)

    def _hand_to_waiter(self, item: ItemT) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        return False

    def _give_back(self, item: ItemT) -> None:
        """Return an item a waiter was handed but cannot use, never raising `Full`.

        In the tick between the hand-off and the waiter waking, an overflow
        connection may have filled the queue; the pool still counts the handed
        one as in use, so it must come back. Resting one past `maxsize` keeps
        the pool's books right (its overflow count includes it), and the next
        check-in into a full queue closes one connection.
        """
        if not self._hand_to_waiter(item):
            self._items.append(item)

    def put(self, item: ItemT, block: bool = True, timeout: float | None = None) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> ItemT:
        if not self._items:
            raise Empty()
        return self._items.pop() if self.use_lifo else self._items.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ItemT:
        if self._items or not block:
            return self.get_nowait()
        waiter: asyncio.Future[ItemT] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await_(self._wait(waiter, limit=timeout))

    async def _wait(self, waiter: asyncio.Future[ItemT], *, limit: float | None) -> ItemT:
        try:
            async with asyncio.timeout(limit):
                return await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result()  # handed one as time ran out: use it
            self._forget(waiter)
            raise Empty() from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())  # handed one just as we were cancelled
            else:
                self._forget(waiter)
            raise

    def _forget(self, waiter: asyncio.Future[ItemT]) -> None:
        waiter.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)


class PoolObserver(Protocol):
    """What a pool reports as it works, for the metrics (`service.metrics.PoolMetrics`)."""

    def in_use(self, *, checked_out: int, overflow: int) -> None: ...

    def waited(self, seconds: float, *, timed_out: bool) -> None: ...


class FairAsyncQueuePool(AsyncAdaptedQueuePool):
    """`AsyncAdaptedQueuePool` with the hand-off queue above, reporting to `observer`
    (when one is set) every checkout and checkin, and every wait for a connection."""

    _queue_class: Any = HandOffQueue
    observer: PoolObserver | None = None

    def _do_get(self) -> ConnectionPoolEntry:
        observer = self.observer
        if observer is None:
            return super()._do_get()
        # The queue waits only when it is empty and no overflow connection may be
        # opened; on one event loop nothing changes between this test and the wait.
        waits = self._pool.empty() and 0 <= self._max_overflow <= self._overflow
        started = time.perf_counter()
        timed_out = False
        try:
            return super()._do_get()
        except sa_exc.TimeoutError:
            timed_out = True
            raise
        finally:
            if waits:
                observer.waited(time.perf_counter() - started, timed_out=timed_out)
            observer.in_use(checked_out=self.checkedout(), overflow=max(self.overflow(), 0))

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        super()._do_return_conn(record)
        if self.observer is not None:
            self.observer.in_use(checked_out=self.checkedout(), overflow=max(self.overflow(), 0))

    def recreate(self) -> FairAsyncQueuePool:
        """`engine.dispose()` swaps in a new pool: it reports to the same observer."""
        pool: FairAsyncQueuePool = super().recreate()  # type: ignore[assignment]
        pool.observer = self.observer
        return pool


def terminate_idle(pool: Pool) -> int:
    """Drop every idle connection of a queue pool at once, without a word to the
    server (the socket is closed): for shutdown, when the server stopped
    answering the polite close, which waits for a reply. Returns how many."""
    if not isinstance(pool, QueuePool):
        return 0
    dropped = 0
    while True:
        try:
            record = pool._pool.get_nowait()
        except Empty:
            return dropped
        if record.dbapi_connection is not None:
            pool._dialect.do_terminate(record.dbapi_connection)
        dropped += 1
