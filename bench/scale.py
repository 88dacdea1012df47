"""The scale-out scenario: the service with 1, 2 and 4 workers, each straight to
PostgreSQL and through a real PgBouncer in transaction mode, under the mixed
workload, with the most server connections PostgreSQL saw during each run.

PgBouncer is the tests' own helper (`tests/pgbouncer.py`: Debian's binary on a
free port, transaction mode, as strict as a hosted one about startup parameters).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness import (
    MAX_OVERFLOW,
    POOL_SIZE,
    ROOT,
    database_url,
    ensure_tool,
    log,
    markdown_table,
    start_service,
    stop,
    tree_cpu_seconds,
    wait_ready,
    wait_until_settled,
)
from loadgen import CONNECTIONS, MIXED_DESCRIPTION, WrkResult, describe, run_wrk

WORKER_COUNTS = (1, 2, 4)
# PgBouncer's server connections for the database: one worker's whole pool, so one
# worker direct and one worker through the bouncer may use the same number.
BOUNCER_POOL_SIZE = POOL_SIZE + MAX_OVERFLOW
WARMUP_SECONDS = 3
SAMPLE_INTERVAL_SECONDS = 0.05
DIRECT, BOUNCED = "direct", "PgBouncer"
SERVER_CONNECTIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class Configuration:
    workers: int
    route: str  # DIRECT or BOUNCED
    url: str  # the database URL the service is given

    @property
    def connection_cap(self) -> int:
        """The most server connections it may open: the bouncer's pool, or every worker's."""
        if self.route == BOUNCED:
            return BOUNCER_POOL_SIZE
        return self.workers * (POOL_SIZE + MAX_OVERFLOW)


@dataclass(frozen=True)
class ScaleResult:
    config: Configuration
    wrk: WrkResult
    peak_connections: int  # server connections seen in pg_stat_activity
    cores: float  # CPU seconds the service's processes used per second of the run


class ConnectionSampler:
    """Counts the database's server connections in pg_stat_activity every 50 ms on
    its own thread (and own connection, to another database) while a run goes on.

        with ConnectionSampler("bench_scale") as sampler:
            run_wrk(...)
        sampler.peak
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.peak = 0
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        self._connected.wait(timeout=10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        if self._error is not None:
            raise RuntimeError("pg_stat_activity sampling failed") from self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._sample())
        except BaseException as exc:  # reported by __exit__, on the caller's thread
            self._error = exc
        finally:
            self._connected.set()

    async def _sample(self) -> None:
        import asyncpg  # only in the venv; see harness

        connection = await asyncpg.connect(database_url("postgres"))
        self._connected.set()
        try:
            while not self._stopping.is_set():
                count = await connection.fetchval(SERVER_CONNECTIONS, self.database)
                self.peak = max(self.peak, count)
                await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)
        finally:
            await connection.close()


def wait_until_closed(database: str, *, timeout: float = 10.0) -> None:
    """Until the last run's server connections are gone (a backend exits a moment
    after its client disconnects), so they are not counted against the next run."""
    give_up_at = time.monotonic() + timeout
    while _connections(database) and time.monotonic() < give_up_at:
        time.sleep(SAMPLE_INTERVAL_SECONDS)


def _connections(database: str) -> int:
    async def count() -> int:
        import asyncpg  # only in the venv; see harness

        connection = await asyncpg.connect(database_url("postgres"))
        try:
            return int(await connection.fetchval(SERVER_CONNECTIONS, database))
        finally:
            await connection.close()

    return asyncio.run(count())


@contextlib.contextmanager
def running_bouncer(database: str) -> Iterator[str]:
    """The URL of `database` through a fresh PgBouncer (transaction mode, a server
    pool of BOUNCER_POOL_SIZE), stopped on exit."""
    ensure_tool("pgbouncer", "pgbouncer")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    # Imported here: it needs pytest and the venv, which run.py enters at startup.
    from tests.pgbouncer import running_pgbouncer

    with running_pgbouncer(database_url(database), pool_size=BOUNCER_POOL_SIZE) as bouncer:
        yield bouncer.url_for(database_url(database))


def measure(
    wrk: str, script: Path, logs: Path, *, database: str, config: Configuration, seconds: int
) -> ScaleResult:
    """Start the service as `config` says, warm it up, then one measured run."""
    wait_until_closed(database)
    name = f"scale-{config.workers}-{config.route}"
    server = start_service(
        config.url, logs, workers=config.workers, pgbouncer=config.route == BOUNCED, name=name
    )
    try:
        wait_ready(server, "/health")
        wait_until_settled(server)
        tag = f"{name}-{os.getpid()}"
        run_wrk(wrk, server.url + "/", script, WARMUP_SECONDS, f"warm-{tag}")
        cpu_before = tree_cpu_seconds(server.process.pid)
        with ConnectionSampler(database) as sampler:
            result = run_wrk(wrk, server.url + "/", script, seconds, tag)
        cores = (tree_cpu_seconds(server.process.pid) - cpu_before) / result.seconds
    finally:
        stop(server)
    log(f"{name:16} {describe(result)}  conns {sampler.peak}  CPU {cores:.2f} cores")
    return ScaleResult(config, result, sampler.peak, cores)


def run_scale_out(
    wrk: str, script: Path, logs: Path, *, database: str, seconds: int
) -> list[ScaleResult]:
    """Every worker count, direct then through the bouncer, one round each. Each
    bounced run gets its own PgBouncer, so no bouncer holds idle server connections
    while a direct run is counted."""
    results = []
    for workers in WORKER_COUNTS:
        direct = Configuration(workers, DIRECT, database_url(database))
        results.append(
            measure(wrk, script, logs, database=database, config=direct, seconds=seconds)
        )
        with running_bouncer(database) as bounced_url:
            bounced = Configuration(workers, BOUNCED, bounced_url)
            results.append(
                measure(wrk, script, logs, database=database, config=bounced, seconds=seconds)
            )
    return results


def _cells(result: ScaleResult) -> list[str]:
    run = result.wrk
    return [
        f"{run.rps:.0f}",
        f"{run.p50_ms:.1f} / {run.p99_ms:.1f}",
        f"{run.non_2xx} / {run.socket_errors}",
        f"{result.peak_connections} / {result.config.connection_cap}",
        f"{result.cores:.2f}",
    ]


def scale_table(results: list[ScaleResult]) -> list[str]:
    """One row per worker count, direct and PgBouncer side by side."""
    by_key = {(r.config.workers, r.config.route): r for r in results}
    columns = ["req/s", "p50 / p99 ms", "errors", "conns max/cap", "CPU cores"]
    header = [
        "workers",
        *(f"{DIRECT} {c}" for c in columns),
        *(f"{BOUNCED} {c}" for c in columns),
    ]
    rows = [
        [str(w), *_cells(by_key[(w, DIRECT)]), *_cells(by_key[(w, BOUNCED)])] for w in WORKER_COUNTS
    ]
    return markdown_table(header, rows)


def scale_section(
    results: list[ScaleResult], *, seconds: int, load: tuple[float, float]
) -> list[str]:
    """The scale-out table with what it ran and how to read it."""
    cores = os.cpu_count() or 0
    return [
        "## Scale-out: WEB_CONCURRENCY 1, 2, 4; direct and through PgBouncer",
        "",
        f"- mixed workload ({MIXED_DESCRIPTION}), wrk {CONNECTIONS} connections, "
        f"{WARMUP_SECONDS} s warm-up then one {seconds} s run per configuration",
        f"- each worker has its own pool of {POOL_SIZE}+{MAX_OVERFLOW}; direct, the cap on "
        f"server connections is workers x {POOL_SIZE + MAX_OVERFLOW}; PgBouncer runs in "
        f"transaction mode with default_pool_size = {BOUNCER_POOL_SIZE} (reserve 0), so its "
        f"cap is {BOUNCER_POOL_SIZE} whatever the worker count, and DB_PGBOUNCER=true",
        "- errors: non-2xx responses / socket errors and timeouts; conns max: the most "
        "client backends on the database in pg_stat_activity, sampled every "
        f"{SAMPLE_INTERVAL_SECONDS * 1000:.0f} ms during the measured run; cap: the most "
        "the configuration may open; CPU cores: CPU seconds all the service's processes used "
        "per second of the run",
        f"- this machine has {cores} cores, shared by the workers, PostgreSQL, PgBouncer and "
        f"wrk: more than {cores} workers cannot add CPU, so 4 workers show the cost of more "
        "processes and connections, not more capacity; one short round per configuration, "
        f"so background load moves these figures (1-minute load average {load[0]:.2f} "
        f"before this scenario, {load[1]:.2f} after)",
        "",
        *scale_table(results),
    ]
