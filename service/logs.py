"""Logging: one format for the service's own lines and uvicorn's, each with its request id."""

from __future__ import annotations

import logging
import logging.config
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# C0 and C1 control characters, DEL and the Unicode line separators, written as
# backslash escapes: a value a client sent (a path, a header) can then neither
# start a new line nor move the cursor of a terminal showing the log.
_CONTROL_ESCAPES = {
    code: repr(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape_controls(text: str) -> str:
    """`text` with every control character backslash-escaped (`\\n`, `\\x1b`)."""
    return text.translate(_CONTROL_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """Writes each record's message on one line whatever values were put in it;
    a traceback, which is ours, still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


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
        "formatters": {"plain": {"()": EscapingFormatter, "fmt": LOG_FORMAT}},
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
