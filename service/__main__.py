"""Command line: `python -m service [serve]` runs the web server, `python -m service
init-db` brings the schema to the latest revision (the Procfile's release phase)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace

from service.config import ConfigError, Settings, load_settings
from service.db import dispose
from service.lifespan import StartupError, start
from service.logs import configure_logging
from service.server import DEFAULT_GRACEFUL_SHUTDOWN_SECONDS, serve

logger = logging.getLogger("service")


async def _check_database(settings: Settings) -> None:
    """Wait for the database (and run init_db when asked) in this process, so a database
    that stays down, or a migration that fails, ends startup here, even when several
    workers would be forked."""
    engine = await start(settings)
    await dispose(engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "init-db"])
    parser.add_argument(
        "--graceful-timeout",
        type=int,
        default=DEFAULT_GRACEFUL_SHUTDOWN_SECONDS,
        metavar="SECONDS",
        help="how long in-flight requests may run after SIGTERM (default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        for line in exc.lines:
            print(f"configuration error: {line}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # The release phase always migrates. The web command migrates here too when
    # INIT_DB is on, once, before any worker starts: the workers' own init_db then
    # finds the latest revision and does nothing.
    try:
        asyncio.run(
            _check_database(
                replace(settings, init_db=settings.init_db or args.command == "init-db")
            )
        )
    except StartupError as exc:
        logger.error("startup failed: %s", exc)
        return 1
    if args.command == "init-db":
        logger.info("init_db done on %s", settings.safe_database_url)
        return 0
    try:
        return serve(settings, graceful_shutdown_seconds=args.graceful_timeout)
    except StartupError as exc:
        logger.error("startup failed: %s", exc)
        return 1
    except OSError as exc:
        logger.error("PORT: cannot listen on 0.0.0.0:%d: %s", settings.port, exc.strerror)
        return 1


if __name__ == "__main__":
    sys.exit(main())
