"""Logging: one format for the service's own lines and uvicorn's, each with its request id."""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request being served (or '-')."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig for every logger, uvicorn's included. uvicorn applies it again in
    each worker process it spawns, which is why it is data and not a function call."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "filters": ["request_id"],
            }
        },
        "loggers": {
            **{
                name: {"handlers": [], "propagate": True}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
            # SQLAlchemy names a pool's logger after its class's module; keep
            # ours as quiet as its own ("Pool disposed" is not news).
            "service.db.pool": {"level": "WARNING"},
            # Alembic lists the plugins it loads on every run; its migration lines stay.
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def configure_logging(level: str) -> None:
    logging.config.dictConfig(logging_config(level))
