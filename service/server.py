"""Running the app under uvicorn the way a platform expects: `0.0.0.0:$PORT`,
`$WEB_CONCURRENCY` workers, proxy headers trusted, bounded graceful shutdown."""

from __future__ import annotations

import logging
import socket

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from service.config import Settings
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
    if config.workers == 1:
        uvicorn.Server(config).run(sockets=[sock])  # exits STARTUP_FAILURE itself
        return 0
    supervisor = Multiprocess(config, sockets=[sock])
    supervisor.run()
    # The supervisor stops when a worker fails to start, but returns as after a
    # SIGTERM: the platform must see the failure to restart the dyno.
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        logger.error("a worker failed to start; exiting with status %d", STARTUP_FAILURE)
        return STARTUP_FAILURE
    return 0
