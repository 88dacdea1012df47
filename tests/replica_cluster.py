"""A throw-away PostgreSQL primary with one streaming replica, for tests.

`initdb` makes a primary on a free loopback port (trust auth, `wal_level=replica`,
a `replication` line in pg_hba.conf); `pg_basebackup -R` copies it into a replica
that streams from it on another free port. As root, everything runs as the
`postgres` OS user (PostgreSQL refuses root). Data lives in a temporary directory
removed at the end.

    with running_cluster(tmp_path) as cluster:
        cluster.primary_url, cluster.replica_url
        cluster.stop_replica(); cluster.start_replica()
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REQUIRE_POSTGRES, fetch_value, free_port

BIN_PATTERN = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_SECONDS = 30
SERVER_SETTINGS = (
    "listen_addresses = '127.0.0.1'\n"
    "unix_socket_directories = ''\n"
    "wal_level = replica\n"
    "max_wal_senders = 5\n"
    "max_connections = 60\n"
    "fsync = off\n"
    "synchronous_commit = on\n"
    "full_page_writes = off\n"
    "shared_buffers = 16MB\n"
    "hot_standby = on\n"
    # A paused or slow replica must not cancel the test's reads.
    "max_standby_streaming_delay = -1\n"
)


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's binaries; skipped (or failed in CI) when absent."""
    found = sorted(glob.glob(BIN_PATTERN), key=lambda path: int(Path(path).parent.name))
    if found and os.access(Path(found[-1]) / "pg_basebackup", os.X_OK):
        return Path(found[-1])
    message = f"PostgreSQL server binaries not found under {BIN_PATTERN}"
    if REQUIRE_POSTGRES:
        pytest.fail(f"{message} and REQUIRE_POSTGRES=1", pytrace=False)
    pytest.skip(message)


@dataclass
class Cluster:
    bin: Path
    directory: Path
    primary_port: int
    replica_port: int
    run_as: pwd.struct_passwd | None

    @property
    def primary_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres"

    @property
    def replica_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.replica_port}/postgres"

    def run(self, *args: str) -> None:
        """Run a PostgreSQL tool as the unprivileged user; its output goes to a log."""
        with (self.directory / "tools.log").open("a") as log:
            subprocess.run(
                [str(self.bin / args[0]), *args[1:]],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.run_as.pw_uid if self.run_as else None,
                group=self.run_as.pw_gid if self.run_as else None,
                extra_groups=[] if self.run_as else None,
                cwd=self.directory,
                timeout=120,
            )

    def _pg_ctl(self, data: str, *args: str) -> None:
        self.run("pg_ctl", "-D", str(self.directory / data), "-w", *args)

    def start_replica(self) -> None:
        self._pg_ctl("replica", "-l", str(self.directory / "replica.log"), "start")

    def stop_replica(self) -> None:
        """As a crash or a pulled plug: no shutdown checkpoint, connections cut."""
        self._pg_ctl("replica", "-m", "immediate", "stop")

    def log(self) -> str:
        parts = [
            (self.directory / name).read_text(errors="replace")
            for name in ("tools.log", "primary.log", "replica.log")
            if (self.directory / name).exists()
        ]
        return "\n".join(parts)


def _unprivileged() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run PostgreSQL as")


def _wait_for_replica(cluster: Cluster) -> None:
    """pg_ctl -w returns once the replica accepts connections; streaming may lag a moment."""
    give_up_at = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < give_up_at:
        try:
            streaming = asyncio.run(
                fetch_value(
                    cluster.primary_url,
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
            )
        except OSError:
            streaming = 0
        if streaming:
            return
        time.sleep(0.1)
    raise AssertionError(f"the replica did not stream within {START_TIMEOUT_SECONDS} s")


@contextmanager
def running_cluster() -> Iterator[Cluster]:
    """A primary and a streaming replica, both stopped and deleted at the end."""
    binaries = postgres_bin()
    run_as = _unprivileged()
    directory = Path(tempfile.mkdtemp(prefix="replicas-"))
    if run_as is not None:
        os.chown(directory, run_as.pw_uid, run_as.pw_gid)
    cluster = Cluster(binaries, directory, free_port(), free_port(), run_as)
    started: list[str] = []
    try:
        try:
            _set_up(cluster, started)
        except (subprocess.CalledProcessError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{cluster.log()}") from exc
        yield cluster
    finally:
        for data in reversed(started):
            with contextlib.suppress(subprocess.CalledProcessError):  # stopped by the test
                cluster._pg_ctl(data, "-m", "immediate", "stop")
        shutil.rmtree(directory, ignore_errors=True)


def _set_up(cluster: Cluster, started: list[str]) -> None:
    """initdb the primary, start it, pg_basebackup the replica, start it; `started`
    names what is running, so the caller stops exactly that."""
    directory = cluster.directory
    cluster.run("initdb", "-D", "primary", "-U", "postgres", "--auth=trust", "-E", "UTF8")
    primary = directory / "primary"
    with (primary / "postgresql.conf").open("a") as conf:
        conf.write(SERVER_SETTINGS + f"port = {cluster.primary_port}\n")
    with (primary / "pg_hba.conf").open("a") as hba:
        hba.write("host replication postgres 127.0.0.1/32 trust\n")
    cluster._pg_ctl("primary", "-l", str(directory / "primary.log"), "start")
    started.append("primary")
    cluster.run(
        "pg_basebackup",
        *("-h", "127.0.0.1", "-p", str(cluster.primary_port), "-U", "postgres"),
        *("-D", "replica", "-R", "-X", "stream", "-c", "fast"),
    )
    with (directory / "replica" / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {cluster.replica_port}\n")
    cluster.start_replica()
    started.append("replica")
    _wait_for_replica(cluster)
