"""Running the app under uvicorn the way a platform expects: `0.0.0.0:$PORT`,
`$WEB_CONCURRENCY` workers, proxy headers trusted, bounded graceful shutdown."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.config import Settings
from service.lifespan import StartupError
from service.logs import logging_config

logger = logging.getLogger(__name__)
APP = "service.app:create_app"
# Platforms send SIGKILL 30 s after SIGTERM; in-flight requests get this long to finish.
DEFAULT_GRACEFUL_SHUTDOWN_SECONDS = 20


def listen(port: int) -> socket.socket:
    """The listening socket, made here rather than by uvicorn.

    Created with IPPROTO_TCP and TCP_NODELAY so every accepted connection has
    Nagle's algorithm off. uvicorn's own socket for several workers has proto 0,
    which makes asyncio skip TCP_NODELAY and delays kept-alive responses by ~40 ms.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("0.0.0.0", port))
    sock.set_inheritable(True)
    return sock


@contextmanager
def metrics_directory(settings: Settings) -> Iterator[None]:
    """Where every worker writes its metrics, so that one scrape can sum them.

    PROMETHEUS_MULTIPROC_DIR when set, emptied first (an earlier run's files would
    add to this run's counts); otherwise, with several workers, a new temporary
    directory for this dyno, removed at exit. It is exported here, before any
    worker starts, because prometheus-client reads it when a worker imports it.
    One worker keeps its metrics in memory, unless the variable is present but
    empty: prometheus-client then counts it as set, and it gets a directory too.
    """
    configured = settings.prometheus_multiproc_dir
    in_memory = settings.web_concurrency == 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if not settings.metrics_enabled or (configured is None and in_memory):
        yield
        return
    if configured is None:
        directory = tempfile.mkdtemp(prefix="service-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    try:
        Path(configured).mkdir(parents=True, exist_ok=True)
        for stale in Path(configured).glob("*.db"):
            stale.unlink()
    except OSError as exc:
        raise StartupError(
            f"PROMETHEUS_MULTIPROC_DIR: cannot use {configured}: {exc.strerror}"
        ) from exc
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = configured  # it may have come from .env
    yield


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor, which also tells prometheus-client when a worker has
    gone (died and replaced, or restarted), so that the live gauges (requests in
    flight, pool figures) stop counting it; its counters still count."""

    def keep_subprocess_alive(self) -> None:
        with self._reporting_exits():
            super().keep_subprocess_alive()

    def restart_all(self) -> None:
        with self._reporting_exits():
            super().restart_all()

    @contextmanager
    def _reporting_exits(self) -> Iterator[None]:
        before = {process.pid for process in self.processes}
        yield
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            for pid in before - {process.pid for process in self.processes}:
                if pid is not None:
                    mark_process_dead(pid)


def serve(settings: Settings, *, graceful_shutdown_seconds: int) -> int:
    """Serve until SIGTERM; the exit status (non-zero when a worker could not start)."""
    config = uvicorn.Config(
        APP,
        factory=True,
        host="0.0.0.0",
        port=settings.port,
        workers=settings.web_concurrency,
        lifespan="on",
        proxy_headers=True,
        forwarded_allow_ips="*",  # the platform's router is the only way in
        log_config=logging_config(settings.log_level),
        access_log=False,  # RequestContextMiddleware logs each request, with its id
        server_header=False,
        timeout_graceful_shutdown=graceful_shutdown_seconds,
    )
    sock = listen(settings.port)
    logger.info(
        "listening on 0.0.0.0:%d with %d worker(s): up to %d database connections in all",
        settings.port,
        settings.web_concurrency,
        settings.web_concurrency * settings.connections_per_process,
    )
    with metrics_directory(settings):
        if config.workers == 1:
            uvicorn.Server(config).run(sockets=[sock])  # exits STARTUP_FAILURE itself
            return 0
        supervisor = WorkerSupervisor(config, sockets=[sock])
        supervisor.run()
    # The supervisor stops when a worker fails to start, but returns as after a
    # SIGTERM: the platform must see the failure to restart the dyno.
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        logger.error("a worker failed to start; exiting with status %d", STARTUP_FAILURE)
        return STARTUP_FAILURE
    return 0
