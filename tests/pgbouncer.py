"""A real PgBouncer for tests: Debian's `pgbouncer` binary, started on a free
loopback port in transaction mode in front of the test PostgreSQL server.

    with running_pgbouncer(postgres_url, pool_size=5) as bouncer:
        url = bouncer.url_for(postgres_url)  # the same database, through the bouncer
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support import REQUIRE_POSTGRES, free_port

# Debian installs it in /usr/sbin, which is often not on a non-root PATH.
PGBOUNCER_LOCATIONS = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
# PgBouncer refuses to run as root; when the tests are root, the first of these runs it.
UNPRIVILEGED_USERS = ("postgres", "nobody")
START_TIMEOUT_SECONDS = 10.0


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skipped when missing, or a failure with REQUIRE_POSTGRES=1."""
    found = shutil.which("pgbouncer") or next(
        (path for path in PGBOUNCER_LOCATIONS if os.access(path, os.X_OK)), None
    )
    if found:
        return found
    message = "pgbouncer is not installed (apt-get install pgbouncer)"
    if REQUIRE_POSTGRES:
        pytest.fail(f"{message} and REQUIRE_POSTGRES=1", pytrace=False)
    pytest.skip(message)


@dataclass
class PgBouncer:
    port: int
    pool_size: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port swapped for the bouncer's."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _config(
    *, port: int, pool_size: int, server: str, directory: Path, ignore: Sequence[str]
) -> str:
    return f"""\
[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
server_login_retry = 1
ignore_startup_parameters = {", ".join(ignore)}
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
"""


def _unprivileged_user() -> pwd.struct_passwd:
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise AssertionError(f"running as root and none of {UNPRIVILEGED_USERS} exists")


def _wait_until_listening(bouncer: PgBouncer) -> None:
    give_up_at = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < give_up_at:
        if bouncer.process.poll() is not None:
            raise AssertionError(f"pgbouncer exited early:\n{bouncer.log()}")
        try:
            with socket.create_connection(("127.0.0.1", bouncer.port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"pgbouncer did not listen within {START_TIMEOUT_SECONDS} s")


@contextmanager
def running_pgbouncer(
    database_url: str, *, pool_size: int = 5, ignore_startup_parameters: Sequence[str] = ()
) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with `pool_size` server connections per database.

    By default it is as strict as a hosted one: any startup parameter it does not
    know (such as `statement_timeout`) ends the connection attempt.
    """
    binary = pgbouncer_binary()
    target = make_url(database_url)
    server = f"host={target.host or '127.0.0.1'} port={target.port or 5432}"
    server += f" user={target.username or 'postgres'}"
    if target.password:
        server += f" password={target.password}"
    run_as = _unprivileged_user() if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="pgbouncer-") as name:
        directory = Path(name)
        port = free_port()
        (directory / "users.txt").write_text(f'"{target.username or "postgres"}" ""\n')
        (directory / "pgbouncer.ini").write_text(
            _config(
                port=port,
                pool_size=pool_size,
                server=server,
                directory=directory,
                ignore=ignore_startup_parameters,
            )
        )
        if run_as is not None:
            for path in (directory, *directory.iterdir()):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        process = subprocess.Popen(
            [binary, str(directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
            start_new_session=True,
        )
        bouncer = PgBouncer(port, pool_size, process, directory / "pgbouncer.log")
        try:
            _wait_until_listening(bouncer)
            yield bouncer
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PgBouncer's safe shutdown in every version (SIGTERM changed meaning
    in 1.23); the service is stopped by then, so anything slower is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
