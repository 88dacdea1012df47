"""Operations, against real processes: startup with the database down, outages
while running, statement timeouts, SIGTERM, secrets in logs, honcho."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from service.db.schema import INIT_DB_LOCK_KEY
from tests.factories import user_body
from tests.proxy import Mode, in_front_of
from tests.support import (
    POSTGRES_ADMIN_URL,
    REPO,
    ServiceProcess,
    execute,
    fetch_value,
    free_port,
    locked_table,
    plain_dsn,
    procfile_command,
    require_postgres,
    running_service,
    wait_for_lock_waiters,
    wait_until,
    wait_until_live,
)

pytestmark = pytest.mark.process

PASSWORD = "s3cret-Pa55word"  # trust auth ignores it; it must never be printed


def with_password(url: str) -> str:
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def count_tables(url: str) -> int:
    return int(
        asyncio.run(fetch_value(url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))  # type: ignore[arg-type]
    )


def serve_until_exit(
    database_url: str, *, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python -m service serve` until it gives up; its output and how long it took."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


# -- startup -------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("mode", [Mode.REFUSE, Mode.SILENT])
def test_database_down_at_startup_exits_non_zero_with_one_line(
    postgres_url: str, tmp_path: Path, mode: Mode
) -> None:
    with in_front_of(postgres_url) as (proxy, proxied_url):
        proxy.set_mode(mode)
        result, took = serve_until_exit(with_password(proxied_url), tmp_path=tmp_path)

    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert result.returncode != 0
    assert 15 < took < 40  # retried for a while, and gave up well inside 60 s
    assert len(errors) == 1
    assert "did not answer within 20 s" in errors[0]
    assert "Traceback" not in output
    assert PASSWORD not in output


@pytest.mark.postgres
def test_a_database_that_comes_back_during_startup_is_waited_for(
    postgres_url: str, tmp_path: Path
) -> None:
    """Refused at first, back after ~3 s: the service keeps retrying, with growing
    delays, then comes up and serves writes without having logged an error."""
    with in_front_of(postgres_url) as (proxy, proxied_url):
        proxy.set_mode(Mode.REFUSE)
        with running_service(
            {"DATABASE_URL": proxied_url}, tmp_path=tmp_path, wait=False
        ) as service:
            wait_until(
                lambda: service.log().count("database not reachable yet") >= 3,
                timeout=15,
                what="three retries while the database refuses",
            )
            assert service.process.poll() is None, service.log()
            proxy.set_mode(Mode.PASS)
            back_at = time.monotonic()
            wait_until_live(service, timeout=15)
            came_up_after = time.monotonic() - back_at
            created = httpx.post(f"{service.base_url}/users", json=user_body(), timeout=10)
    log = service.log()

    delays = [float(d) for d in re.findall(r"retrying in ([\d.]+) s", log)]
    assert delays == sorted(delays) and delays[0] < delays[-1], delays  # backing off
    assert came_up_after < 10
    assert created.status_code == 201, created.text
    assert " ERROR " not in log, log
    assert "Traceback" not in log


@pytest.mark.postgres
def test_a_database_that_refuses_the_service_fails_fast(tmp_path: Path) -> None:
    """A wrong database name will not fix itself: no point retrying for 20 s."""
    require_postgres()
    url = make_url(POSTGRES_ADMIN_URL).set(database="no_such_database_here")

    result, took = serve_until_exit(url.render_as_string(hide_password=False), tmp_path=tmp_path)

    assert result.returncode != 0
    assert took < 10
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert 'database "no_such_database_here" does not exist' in errors[0]


@pytest.mark.postgres
def test_four_workers_start_together_on_an_empty_database(
    postgres_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": postgres_url, "WEB_CONCURRENCY": "4"}
    with running_service(env, tmp_path=tmp_path) as service:
        wait_until(
            lambda: service.log().count("Application startup complete") >= 4,
            timeout=30,
            what="four workers started",
        )
        created = httpx.post(f"{service.base_url}/users", json=user_body())

    assert created.status_code == 201
    assert "Traceback" not in service.log()
    assert count_tables(postgres_url) == len(SQLModel.metadata.tables) + 1  # + alembic_version


@pytest.mark.postgres
@pytest.mark.parametrize("workers", ["1", "2"])
def test_init_db_that_fails_ends_startup_with_one_line_and_non_zero(
    postgres_url: str, tmp_path: Path, workers: str
) -> None:
    """A role that may not create tables: the database answers, init_db cannot work."""
    role = f"svc_reader_{uuid.uuid4().hex[:8]}"
    asyncio.run(execute(POSTGRES_ADMIN_URL, f'CREATE ROLE "{role}" LOGIN'))
    try:
        url = make_url(postgres_url).set(username=role).render_as_string(False)
        started = time.monotonic()
        result = subprocess.run(
            procfile_command("web"),
            shell=True,
            cwd=tmp_path,
            env={
                **os.environ,
                "DATABASE_URL": url,
                "WEB_CONCURRENCY": workers,
                "PORT": str(free_port()),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - started
    finally:
        asyncio.run(execute(POSTGRES_ADMIN_URL, f'DROP ROLE "{role}"'))

    output = result.stdout + result.stderr
    causes = {line.split("] ", 1)[1] for line in output.splitlines() if "init_db failed" in line}
    assert result.returncode != 0, output
    assert len(causes) == 1, output  # one line (from each worker that got that far)
    assert "permission denied for schema public" in causes.pop()
    assert "Traceback" not in output
    assert took < 20  # a refusal is not retried


HOLD_INIT_LOCK = f"""
import asyncio, sys, asyncpg
async def main():
    connection = await asyncpg.connect(sys.argv[1])
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock({INIT_DB_LOCK_KEY})")
        print("locked", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
asyncio.run(main())
"""


@pytest.mark.postgres
def test_init_db_retries_a_transient_failure_within_the_startup_deadline(
    postgres_url: str, tmp_path: Path
) -> None:
    """init_db waits on its advisory lock, held elsewhere, and its statement times
    out after 1 s (SQLSTATE 57014, transient): retried until the lock is let go,
    then the service starts."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_INIT_LOCK, plain_dsn(postgres_url)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        env = {"DATABASE_URL": postgres_url, "DB_STATEMENT_TIMEOUT_MS": "1000"}
        with running_service(env, tmp_path=tmp_path, wait=False) as service:
            deadline = time.monotonic() + 15
            while "QueryCanceledError" not in service.log():
                assert time.monotonic() < deadline, service.log()
                assert service.process.poll() is None, service.log()
                time.sleep(0.05)
            holder.stdin.write("\n")
            holder.stdin.flush()
            wait_until_live(service)
            created = httpx.post(f"{service.base_url}/users", json=user_body())
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    assert created.status_code == 201
    assert "(QueryCanceledError: canceling statement due to statement timeout); retrying" in (
        service.log()
    )
    assert "Traceback" not in service.log()


@pytest.mark.postgres
def test_release_creates_the_schema_and_can_run_twice(postgres_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": postgres_url,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }

    runs = [
        subprocess.run(
            procfile_command("release"),
            shell=True,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for _ in range(2)
    ]

    assert [run.returncode for run in runs] == [0, 0], runs[-1].stderr
    assert count_tables(postgres_url) == len(SQLModel.metadata.tables) + 1  # + alembic_version


@pytest.mark.postgres
def test_init_db_false_leaves_the_schema_alone(postgres_url: str, tmp_path: Path) -> None:
    with running_service({"DATABASE_URL": postgres_url, "INIT_DB": "false"}, tmp_path=tmp_path):
        tables = count_tables(postgres_url)

    assert tables == 0


# -- outages ---------------------------------------------------------------------


@pytest.mark.postgres
def test_a_silent_database_is_503_quickly_and_recovers(postgres_url: str, tmp_path: Path) -> None:
    """Packets dropped, not refused: timeouts must bound every wait."""
    with in_front_of(postgres_url) as (proxy, proxied_url):
        env = {"DATABASE_URL": proxied_url, "DB_STATEMENT_TIMEOUT_MS": "1000"}
        with running_service(env, tmp_path=tmp_path) as service:
            base = service.base_url
            created = httpx.post(f"{base}/users", json=user_body())
            assert created.status_code == 201, created.text
            uid = created.json()["uid"]
            assert httpx.get(f"{base}/health").status_code == 200

            proxy.set_mode(Mode.SILENT)
            started = time.monotonic()
            health = httpx.get(f"{base}/health", timeout=30)
            health_took = time.monotonic() - started
            started = time.monotonic()
            read = httpx.get(f"{base}/users/{uid}", timeout=30)
            read_took = time.monotonic() - started

            proxy.set_mode(Mode.PASS)
            recovered_at = time.monotonic()
            while httpx.get(f"{base}/users/{uid}", timeout=30).status_code != 200:
                assert time.monotonic() - recovered_at < 30
            after = [httpx.get(f"{base}/users/{uid}", timeout=30).status_code for _ in range(20)]
            health_after = httpx.get(f"{base}/health", timeout=30)

    assert health.status_code == 503
    assert health.json()["status"] == "fail"
    assert health.headers["retry-after"].isdigit()
    assert health_took < 4
    assert read.status_code == 503
    assert read.headers["retry-after"].isdigit()
    assert read_took < 10
    assert after == [200] * 20  # no pooled connection stayed broken
    assert health_after.status_code == 200


@pytest.mark.postgres
def test_a_statement_over_the_timeout_is_a_problem_response(
    postgres_url: str, tmp_path: Path
) -> None:
    async def blocked_list(base_url: str) -> tuple[httpx.Response, float]:
        async with locked_table(postgres_url):
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
                response = await client.get("/users")
            return response, time.monotonic() - started

    env = {"DATABASE_URL": postgres_url, "DB_STATEMENT_TIMEOUT_MS": "500"}
    with running_service(env, tmp_path=tmp_path) as service:
        response, took = asyncio.run(blocked_list(service.base_url))

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert 0.4 < took < 5


# -- shutdown --------------------------------------------------------------------


async def refuses_new_connections(base_url: str, *, within: float = 10) -> bool:
    """Whether the server stops accepting within `within` seconds of being told to."""
    give_up_at = time.monotonic() + within
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < give_up_at:
            try:
                await client.get(f"{base_url}/health/live")
            except httpx.TransportError:
                return True
            await asyncio.sleep(0.05)
    return False


@pytest.mark.postgres
def test_sigterm_finishes_in_flight_requests_then_lets_go_of_the_database(
    postgres_url: str, tmp_path: Path
) -> None:
    async def scenario(service: ServiceProcess) -> tuple[list[int], bool]:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            async with locked_table(postgres_url):
                in_flight = [asyncio.create_task(client.get("/users")) for _ in range(3)]
                await wait_for_lock_waiters(postgres_url, 3)
                service.terminate()
                refused_new = await refuses_new_connections(service.base_url)
            statuses = [(await task).status_code for task in in_flight]
        return statuses, refused_new

    with running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service:
        started = time.monotonic()
        statuses, refused_new = asyncio.run(scenario(service))
        wait_until(lambda: not service.is_running(), timeout=30, what="the service exits")
        took = time.monotonic() - started
        left = asyncio.run(
            fetch_value(
                postgres_url,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
        )

    assert statuses == [200, 200, 200]
    assert refused_new
    assert took < 10
    assert left == 0


# The platform's SIGKILL comes 30 s after SIGTERM; the Procfile's graceful timeout
# (20 s) plus uvicorn's and the engine's own closing must fit well inside it.
PLATFORM_KILL_SECONDS = 30


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_the_procfile_web_command_exits_inside_30_s_with_a_stuck_request(
    postgres_url: str, tmp_path: Path
) -> None:
    """The Procfile's own `web:` line, not a test's shorter timeout: a request stuck
    behind a lock that is never released must not carry shutdown past SIGKILL."""

    async def hold_and_stop(service: ServiceProcess) -> float:
        async with (
            locked_table(postgres_url),
            httpx.AsyncClient(base_url=service.base_url, timeout=60) as client,
        ):
            stuck = asyncio.create_task(client.get("/users"))
            await wait_for_lock_waiters(postgres_url, 1)
            started = time.monotonic()
            service.terminate()
            while service.is_running() and time.monotonic() - started < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling another process: no event to await
            took = time.monotonic() - started
            stuck.cancel()
            return took

    env = {"DATABASE_URL": postgres_url, "DB_STATEMENT_TIMEOUT_MS": "120000"}
    with running_service(env, tmp_path=tmp_path) as service:
        took = asyncio.run(hold_and_stop(service))

    # 2 s of margin for a loaded machine; measured about 25 s.
    assert took < PLATFORM_KILL_SECONDS - 2


@pytest.mark.postgres
def test_sigterm_with_a_silent_database_ends_well_inside_30_s(
    postgres_url: str, tmp_path: Path
) -> None:
    """A warm pool, then the database drops every packet: closing each connection
    politely would wait out the 16 s command timeout, one after another."""

    async def warm_up(base_url: str) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            await asyncio.gather(*(client.get("/users") for _ in range(40)))

    with in_front_of(postgres_url) as (proxy, proxied_url):
        env = {"DATABASE_URL": proxied_url}
        with running_service(env, tmp_path=tmp_path) as service:
            asyncio.run(warm_up(service.base_url))
            warm = asyncio.run(
                fetch_value(
                    postgres_url,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
            )
            proxy.set_mode(Mode.SILENT)
            started = time.monotonic()
            service.terminate()
            while service.is_running() and time.monotonic() - started < 60:
                time.sleep(0.05)
            took = time.monotonic() - started

    assert warm >= 3  # type: ignore[operator]
    assert took < 12, service.log()  # 5 s of polite closing at most, then dropped
    assert "dropped the" in service.log()


# -- secrets and logs ------------------------------------------------------------


def test_each_request_has_one_access_line_with_its_id(tmp_path: Path) -> None:
    with running_service({}, tmp_path=tmp_path) as service:
        base = service.base_url
        created = httpx.post(f"{base}/users", json=user_body(), headers={"X-Request-ID": "r" * 24})
        missing = httpx.get(f"{base}/users/{'0' * 8}-0000-4000-8000-{'0' * 12}")
    access = [line for line in service.log().splitlines() if "service.access" in line]

    assert created.status_code == 201, created.text
    assert any(re.search(r"\[r{24}\] POST /users 201 [\d.]+ms$", line) for line in access), access
    request_id = missing.headers["x-request-id"]
    assert [line for line in access if f"[{request_id}]" in line] == [
        next(line for line in access if "GET /users/00000000" in line)
    ]


@pytest.mark.postgres
def test_the_database_password_is_never_logged_or_sent(postgres_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": with_password(postgres_url), "LOG_LEVEL": "debug"}
    with running_service(env, tmp_path=tmp_path) as service:
        base = service.base_url
        responses = [
            httpx.post(f"{base}/users", json=user_body()),
            httpx.get(f"{base}/users/{'0' * 8}-0000-4000-8000-{'0' * 12}"),
            httpx.get(f"{base}/health"),
        ]
    log = service.log()

    assert [response.status_code for response in responses] == [201, 404, 200]
    assert "postgresql+asyncpg://postgres:***@" in log  # the URL is logged, masked
    assert PASSWORD not in log
    assert all(PASSWORD not in response.text for response in responses)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_log_level_is_the_lowest_level_written(level: str, tmp_path: Path) -> None:
    """At info each request has an access line; at warning only warnings and worse
    (the open-service warning still shows); at error not even that."""
    with running_service({"LOG_LEVEL": level}, tmp_path=tmp_path) as service:
        assert httpx.get(f"{service.base_url}/users").status_code == 200
    lines = service.log().splitlines()

    below = LEVELS[: LEVELS.index(level.upper())]
    written = {name for line in lines for name in LEVELS if f" {name} " in line}
    assert not written & set(below), lines
    has_access_line = any("service.access" in line and "GET /users 200" in line for line in lines)
    assert has_access_line is (level == "info")
    assert any("API_KEYS is not set" in line for line in lines) is (level != "error")


@pytest.mark.postgres
def test_logs_hold_no_sql_parameters_and_name_the_sqlstate_of_a_503(
    postgres_url: str, tmp_path: Path
) -> None:
    """A 500's traceback must not carry the bound values (emails, prompts); a 503's
    line says which fault it was."""
    email = "private-person@example.com"
    refuse_inserts = """
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION refuse();
    """

    async def read_while_locked(base_url: str) -> httpx.Response:
        async with (
            locked_table(postgres_url),
            httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        ):
            return await client.get("/users")

    env = {"DATABASE_URL": postgres_url, "DB_STATEMENT_TIMEOUT_MS": "300"}
    with running_service(env, tmp_path=tmp_path) as service:
        asyncio.run(execute(postgres_url, refuse_inserts))
        failed = httpx.post(f"{service.base_url}/users", json=user_body(email=email))
        timed_out = asyncio.run(read_while_locked(service.base_url))
    log = service.log()

    assert failed.status_code == 500
    assert "Traceback" in log  # the operator still gets the error itself...
    assert email not in log  # ...without the values bound to it
    assert timed_out.status_code == 503
    assert "database unavailable: DBAPIError (SQLSTATE 57014)" in log


# -- a platform's view -------------------------------------------------------------


def test_honcho_start_web_with_the_example_env(tmp_path: Path) -> None:
    """What an operator does first: `.env` from `.env.example`, then `honcho start web`."""
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    port = free_port()
    honcho = Path(sys.executable).parent / "honcho"
    process = subprocess.Popen(
        [
            str(honcho),
            "-f",
            str(REPO / "Procfile"),
            "-d",
            str(tmp_path),
            "start",
            "-p",
            str(port),
            "web",
        ],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        created = httpx.post(f"http://127.0.0.1:{port}/users", json=user_body())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=30)[0]

    assert health.status_code == 200, output
    assert created.status_code == 201
    assert (tmp_path / "service.db").exists()


def test_plain_honcho_start_runs_release_then_stops_web_with_it(tmp_path: Path) -> None:
    """`honcho start` with no process name runs every Procfile line: release creates
    the schema and exits, and honcho then stops web and exits itself."""
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    honcho = Path(sys.executable).parent / "honcho"
    result = subprocess.run(
        [str(honcho), "-f", str(REPO / "Procfile"), "-d", str(tmp_path), "start"],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    lines = output.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert result.returncode == 0, output
    assert first("init_db done") < first("release.1 stopped (rc=0)")
    assert first("release.1 stopped") < first("sending SIGTERM to web.1") < first("web.1 stopped")
    with sqlite3.connect(tmp_path / "service.db") as database:
        tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master")}
    assert {"users", "conversations", "messages"} <= tables
