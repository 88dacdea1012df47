"""Logs cannot be forged: what a client sends is written on the line it belongs to."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx

from service.logs import LOG_FORMAT, EscapingFormatter, escape_controls
from tests.support import running_service

FORGED = "2026-01-01 00:00:00,000 INFO service.access [forged] DELETE /users/x 204 1.0ms"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+ \[[^\]]+\] ")


def test_a_percent_encoded_newline_in_the_path_cannot_forge_a_log_line(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/forge.db"}
    with running_service(env, tmp_path=tmp_path) as service:
        target = f"/users%0A{FORGED.replace(' ', '%20')}%0D%1B[2J"
        response = httpx.get(f"{service.base_url}{target}")
    log = service.log()

    assert response.status_code == 404
    assert not any(line.startswith(FORGED[:23]) for line in log.splitlines()), log
    access = [line for line in log.splitlines() if "service.access" in line and "%0A" in line]
    assert len(access) == 1, log
    assert LOG_LINE.match(access[0])
    assert access[0].endswith(f"GET {target} 404 {access[0].rsplit(' ', 1)[1]}")


def test_the_formatter_escapes_control_characters_in_every_value() -> None:
    formatter = EscapingFormatter(fmt=LOG_FORMAT)
    record = logging.LogRecord(
        "service.test", logging.INFO, __file__, 1, "header %s", ("a\nb\r\x1b[31m\x85\u2028",), None
    )
    record.request_id = "-"

    line = formatter.format(record)

    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith(r"header a\nb\r\x1b[31m\x85\u2028")


def test_escaping_leaves_printable_text_alone() -> None:
    assert escape_controls("/users/é?q=1 ok") == "/users/é?q=1 ok"
