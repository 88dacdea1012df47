"""Helpers shared by the tests: databases to test against and a real service process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("REQUIRE_POSTGRES") == "1"
# How much of a real service's log a failed test prints.
LOG_TAIL_LINES = 60
# What reads an environment variable in service/: environs' `env.<type>("NAME"...)` and
# plain `os.environ`/`os.getenv` reads.
_VARIABLE_READ = re.compile(
    r"""(?:\benv\.\w+|os\.environ\.get|os\.getenv|os\.environ)\s*[(\[]\s*["']([A-Z][A-Z0-9_]*)["']"""
)


def service_variables() -> tuple[str, ...]:
    """Every variable the service reads, found in its source, so a new one cannot be
    missed by the tests' clean environment or the .env.example check."""
    names = {
        name
        for source in sorted((REPO / "service").rglob("*.py"))
        for name in _VARIABLE_READ.findall(source.read_text())
    }
    return tuple(sorted(names))


SERVICE_VARIABLES = service_variables()
# A timestamp as the service writes it: RFC 3339, in UTC.
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def plain_dsn(database_url: str) -> str:
    """asyncpg wants a plain postgresql:// DSN, whatever driver the URL names."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    await execute(POSTGRES_ADMIN_URL, sql)


def postgres_available() -> bool:
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError):
        return False
    return True


def require_postgres() -> None:
    """Skip when PostgreSQL is absent, or fail when REQUIRE_POSTGRES=1 (as in CI)."""
    if postgres_available():
        return
    message = f"PostgreSQL is not reachable at {make_url(POSTGRES_ADMIN_URL)!r}"
    if REQUIRE_POSTGRES:
        pytest.fail(f"{message} and REQUIRE_POSTGRES=1", pytrace=False)
    pytest.skip(message)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database for one test; its URL as a platform would give it."""
    require_postgres()
    name = f"svc_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def fetch_value(database_url: str, sql: str) -> object:
    """One value straight from PostgreSQL, bypassing the service."""
    connection = await asyncpg.connect(plain_dsn(database_url), timeout=5)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


async def execute(database_url: str, sql: str) -> None:
    """Run one or more statements straight on PostgreSQL, bypassing the service."""
    connection = await asyncpg.connect(plain_dsn(database_url), timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    process: subprocess.Popen[str]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self) -> None:
        """SIGTERM to every process of the command, as a platform stops a dyno."""
        os.killpg(self.process.pid, signal.SIGTERM)

    def is_running(self) -> bool:
        """Whether any live process of the command (shell, server, workers) is left;
        zombies do not count, since nothing here may reap them."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, process_group = fields[0], int(fields[2])
            if process_group == self.process.pid and state != "Z":
                return True
        return False


def wait_until_live(service: ServiceProcess, *, timeout: float = 20) -> None:
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        if service.process.poll() is not None:
            raise AssertionError(f"service exited early:\n{service.log()}")
        try:
            if httpx.get(f"{service.base_url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"service did not come up in {timeout} s:\n{service.log()}")


@contextmanager
def running_service(
    env: dict[str, str],
    *,
    command: str | None = None,
    tmp_path: Path,
    wait: bool = True,
    cwd: Path | None = None,
    bin_dir: Path | None = None,
) -> Iterator[ServiceProcess]:
    """Start the service as a real process (by default the Procfile's web command)
    on a free port, and stop it with SIGTERM at the end.

    It runs in `cwd` (default `tmp_path`, which also holds its log) with `bin_dir`
    (default this interpreter's) first on PATH, as an activated virtualenv would be."""
    port = free_port()
    command = command or procfile_command("web")
    log_path = tmp_path / f"service-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            shell=True,  # a Procfile line is a shell command
            cwd=cwd or tmp_path,
            env={**os.environ, **env, "PORT": str(port), "PATH": path_with(bin_dir)},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)
    failed = False
    try:
        if wait:
            wait_until_live(service)
        yield service
    except BaseException:
        failed = True
        raise
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # The shell may exit before the server it started: its last log lines
        # (access lines, shutdown) are only complete once every process is gone.
        wait_until(lambda: not service.is_running(), timeout=30, what="the service exits")
        if failed:
            # pytest shows a failed test's stdout: the server's side of the story.
            tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            print(f"--- last lines of {log_path.name} ---", *tail, sep="\n")


def path_with(bin_dir: Path | None = None) -> str:
    """PATH with `bin_dir` (default this interpreter's) first, so `python` in a Procfile
    line is the one under test."""
    first = bin_dir or Path(sys.executable).parent
    return f"{first}{os.pathsep}{os.environ.get('PATH', '')}"


def procfile_command(process_type: str, *, root: Path = REPO) -> str:
    for line in (root / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process_type:
            return command.strip()
    raise AssertionError(f"Procfile has no {process_type}: line")


# -- waiting on a condition, not a clock ------------------------------------------


def wait_until(
    predicate: Callable[[], object], *, timeout: float, interval: float = 0.05, what: str = ""
) -> None:
    """Poll `predicate` until it is true; fail naming `what` when `timeout` passes first."""
    give_up_at = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up_at:
            raise AssertionError(f"not true within {timeout} s: {what or predicate}")
        time.sleep(interval)


async def wait_for_lock_waiters(database_url: str, count: int, *, within: float = 10) -> None:
    """Wait until `count` sessions are blocked on a lock: the requests under test have
    reached the database, which a fixed sleep could only hope for."""
    connection = await asyncpg.connect(plain_dsn(database_url), timeout=5)
    try:
        give_up_at = time.monotonic() + within
        while True:
            waiting = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            if time.monotonic() > give_up_at:
                raise AssertionError(f"{waiting} of {count} requests reached the lock")
            await asyncio.sleep(0.02)
    finally:
        await connection.close()


@asynccontextmanager
async def locked_table(
    database_url: str, table: str = "users"
) -> AsyncIterator[asyncpg.Connection]:
    """Hold an ACCESS EXCLUSIVE lock on `table` from another session, so any request
    touching it waits; the lock goes when the block ends. Yields that session."""
    connection = await asyncpg.connect(plain_dsn(database_url), timeout=5)
    try:
        async with connection.transaction():
            await connection.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
            yield connection
    finally:
        await connection.close()


# -- values as the service writes them ----------------------------------------------


def encode_cursor(value: object) -> str:
    """A page cursor of the service's encoding (URL-safe base64 of JSON, unpadded),
    around any value, or around raw bytes as given."""
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_time(text: str) -> datetime:
    """A timestamp the service sent, checked to be RFC 3339 in UTC; compare these,
    not the strings (a zero microsecond drops the fraction from the text)."""
    assert RFC3339_UTC.match(text), f"not an RFC 3339 UTC timestamp: {text!r}"
    return datetime.fromisoformat(text)


def assert_ids_and_times(body: dict[str, object], *, ids: list[str], times: list[str]) -> None:
    """Each named id is a UUID the service made (version 4), each named time RFC 3339 UTC."""
    for name in ids:
        assert uuid.UUID(str(body[name])).version == 4, f"{name}: {body[name]!r}"
    for name in times:
        parse_time(str(body[name]))


# Prometheus samples by (sample name, its labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape(base_url: str, **headers: str) -> Samples:
    """One GET /metrics of a running service, parsed."""
    response = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return parse_metrics(response.text)
