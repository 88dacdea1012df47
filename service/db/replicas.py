"""Streaming replicas: where each one has replayed to, how stale it is, and
which one a read may use.

A background monitor asks the primary for `pg_current_wal_lsn()` and each
replica for `pg_last_wal_replay_lsn()` a few times a second, each over a
connection of its own (a busy request pool must not blind it). A request
then decides in memory: no round trip is added to a read.

Staleness is bounded by time, not by bytes: each primary position is kept
with the moment it was asked for, so a replica that has replayed past it
holds everything committed before that moment (`as_of`). A replica serves
reads only while `now - as_of <= DB_REPLICA_MAX_LAG_MS`; an idle primary
adds no lag, since its position does not move and the replica stays level
with it at every poll. A monitor that cannot reach a replica (or the
primary) stops refreshing `as_of`, so a replica is also dropped when it
can no longer be checked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db.engine import autocommit, create_engine, create_monitor_engine

logger = logging.getLogger(__name__)
POLL_INTERVAL_SECONDS = 0.25
# One monitor query on one server may take this long before the server counts as down.
POLL_TIMEOUT_SECONDS = 1.0
# How long primary positions are kept beyond the lag bound.
SAMPLE_MARGIN_SECONDS = 2.0
LSN_PATTERN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int | None:
    """PostgreSQL's `X/Y` hex text as a number that compares like `pg_lsn`; None if malformed."""
    match = LSN_PATTERN.fullmatch(text)
    if match is None:
        return None
    return int(match[1], 16) << 32 | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(eq=False)
class Replica:
    """One replica: its request pool (`engine`, and its autocommit view for reads),
    the monitor's connection, and what the monitor last saw."""

    name: str
    engine: AsyncEngine
    autocommit_engine: AsyncEngine
    monitor: AsyncEngine
    reachable: bool = False
    replayed: int = 0
    # Monotonic time of the newest primary position this replica had replayed past.
    as_of: float = -math.inf
    caught_up: bool = False
    error: str | None = None

    def lag_seconds(self, now: float) -> float:
        return 0.0 if self.caught_up else now - self.as_of

    def serves(self, *, now: float, max_lag: float, token: int | None) -> bool:
        return (
            self.reachable
            and now - self.as_of <= max_lag
            and (token is None or self.replayed >= token)
        )

    def mark_down(self, reason: str) -> None:
        """No reads here until the monitor reaches it again."""
        if self.reachable:
            logger.warning("replica %s is down: %s", self.name, reason)
        self.reachable = False
        self.error = reason


@dataclass(eq=False)
class ReplicaSet:
    """The replicas of one primary, and the monitor that keeps their state fresh.

    replicas = ReplicaSet.create(settings)
    await replicas.poll()          # once before serving, then `run()` in the background
    replica = replicas.choose(token)  # None: use the primary
    """

    replicas: Sequence[Replica]
    primary_monitor: AsyncEngine
    max_lag: float
    # (monotonic time before asking, the primary's position then), oldest first.
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    primary_error: str | None = None
    # Told each replica's lag after every poll (the metrics' `record_replica_lag`).
    on_lag: Callable[[str, float], None] | None = None
    _turns: Iterator[int] = field(init=False)

    def __post_init__(self) -> None:
        self._turns = itertools.cycle(range(len(self.replicas)))

    @classmethod
    def create(cls, settings: Settings) -> ReplicaSet:
        """A pool sized like the primary's for every replica, plus the monitor connections."""
        replicas = [_make_replica(settings, url) for url in settings.database_replica_urls]
        return cls(
            replicas=replicas,
            primary_monitor=create_monitor_engine(settings, url=settings.database_url),
            max_lag=settings.db_replica_max_lag_ms / 1000,
        )

    def choose(self, token: int | None) -> Replica | None:
        """A replica that may serve a read now (taking turns between several), one
        that has replayed past `token` when there is one; None means the primary."""
        now = time.monotonic()
        for _ in range(len(self.replicas)):
            replica = self.replicas[next(self._turns)]
            if replica.serves(now=now, max_lag=self.max_lag, token=token):
                return replica
        return None

    async def poll(self) -> None:
        """One round: the primary's position first, then every replica's at once."""
        asked_at = time.monotonic()
        try:
            async with asyncio.timeout(POLL_TIMEOUT_SECONDS):
                position = await _fetch(self.primary_monitor, "SELECT pg_current_wal_lsn()::text")
        except Exception as exc:
            self._note_primary_error(exc)
        else:
            self.primary_error = None
            if position is not None:
                self.samples.append((asked_at, position))
        while len(self.samples) > 1 and asked_at - self.samples[1][0] > (
            self.max_lag + SAMPLE_MARGIN_SECONDS
        ):
            self.samples.popleft()
        await asyncio.gather(*(self._poll_replica(replica) for replica in self.replicas))
        if self.on_lag is not None:
            now = time.monotonic()
            for replica in self.replicas:
                self.on_lag(replica.name, replica.lag_seconds(now))

    async def run(self) -> None:
        """Poll until cancelled (at shutdown)."""
        while True:
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
            await self.poll()

    async def _poll_replica(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(POLL_TIMEOUT_SECONDS):
                async with replica.monitor.connect() as connection:
                    row = (
                        await connection.exec_driver_sql(
                            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
                        )
                    ).one()
        except Exception as exc:
            replica.mark_down(_describe(exc))
            return
        in_recovery, replayed_text = row
        replayed = parse_lsn(replayed_text or "")
        if not in_recovery or replayed is None:
            replica.mark_down("not a streaming replica (pg_is_in_recovery() is false)")
            return
        if not replica.reachable:
            logger.info("replica %s is reachable", replica.name)
        replica.reachable, replica.error, replica.replayed = True, None, replayed
        for sampled_at, position in reversed(self.samples):
            if position <= replayed:
                replica.as_of = max(replica.as_of, sampled_at)
                break
        replica.caught_up = bool(self.samples) and replayed >= self.samples[-1][1]

    def _note_primary_error(self, exc: Exception) -> None:
        reason = _describe(exc)
        if self.primary_error is None:
            logger.warning("replica monitor cannot read the primary's position: %s", reason)
        self.primary_error = reason

    def report(self) -> list[dict[str, Any]]:
        """Each replica for /health: pass (serving reads), warn (behind the bound), fail (down)."""
        now = time.monotonic()
        entries = []
        for replica in self.replicas:
            if not replica.reachable:
                status = "fail"
            elif replica.serves(now=now, max_lag=self.max_lag, token=None):
                status = "pass"
            else:
                status = "warn"
            lag = replica.lag_seconds(now)
            entries.append(
                {
                    "name": replica.name,
                    "status": status,
                    "lag_ms": round(lag * 1000) if math.isfinite(lag) else None,
                    "replayed": format_lsn(replica.replayed) if replica.replayed else None,
                    **({"error": replica.error} if replica.error else {}),
                }
            )
        return entries

    def engines(self) -> list[AsyncEngine]:
        """Every engine this set owns, for disposal at shutdown."""
        owned = [self.primary_monitor]
        for replica in self.replicas:
            owned += [replica.engine, replica.monitor]
        return owned


def _make_replica(settings: Settings, url: URL) -> Replica:
    engine = create_engine(settings, url=url)
    return Replica(
        name=f"{url.host}:{url.port or 5432}/{url.database}",
        engine=engine,
        autocommit_engine=autocommit(engine),
        monitor=create_monitor_engine(settings, url=url),
    )


async def _fetch(engine: AsyncEngine, sql: str) -> int | None:
    async with engine.connect() as connection:
        text = (await connection.exec_driver_sql(sql)).scalar_one()
    return parse_lsn(text or "")


def _describe(exc: BaseException) -> str:
    """The error's class and first line; drivers never put the password there."""
    cause = getattr(exc, "orig", None) or exc
    first_line = next(iter(str(cause).splitlines()), "")
    name = type(cause).__name__
    return f"{name}: {first_line}" if first_line else name
