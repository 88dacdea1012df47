"""Plumbing shared by the benchmark scripts: tools, databases, processes.

Only the standard library is imported at module level, so a script can import
this before `reexec_in_venv()` has moved it into the project's venv.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
VENV = ROOT / ".venv"
# The peers run in a venv of their own, so their frameworks never enter the service's.
PEER_VENV = BENCH / ".venv-peers"
PEER_REQUIREMENTS = BENCH / "peers-requirements.txt"
PG_URL = "postgresql://postgres@127.0.0.1:5432"

POOL_SIZE, MAX_OVERFLOW = 5, 5  # a pool of 10, as the performance issue fixes it
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 25.0  # the Procfile's graceful timeout is 20 s
# Debian installs some tools in /usr/sbin, which is often not on a non-root PATH.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")

SeedRow = tuple[object, ...]


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- setup ---------------------------------------------------------------------------


def reexec_in_venv() -> None:
    """Run under the project's venv, where asyncpg, uvicorn and the service live."""
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.argv])


def _find_tool(binary: str) -> str | None:
    candidates = (os.path.join(directory, binary) for directory in SBIN_DIRS)
    return shutil.which(binary) or next((p for p in candidates if os.access(p, os.X_OK)), None)


def ensure_tool(binary: str, package: str) -> str:
    """A tool from Debian's packages; the package lists are refreshed only if the
    install fails, so a machine that has the tool never touches apt."""
    found = _find_tool(binary)
    if found:
        return found
    log(f"installing {package} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", package]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = _find_tool(binary)
    if not found:
        raise SystemExit(f"{binary} is still missing after apt-get install -y {package}")
    return found


def ensure_peer_venv() -> str:
    """The python of bench/.venv-peers, created or brought in line with the pinned
    requirements when they differ from what it was last installed from."""
    python = PEER_VENV / "bin" / "python"
    installed = PEER_VENV / "installed-requirements.txt"
    wanted = PEER_REQUIREMENTS.read_text()
    if python.exists() and installed.exists() and installed.read_text() == wanted:
        return str(python)
    log(f"installing {PEER_REQUIREMENTS.name} into {PEER_VENV.relative_to(ROOT)}")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, "-r", str(PEER_REQUIREMENTS)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"pip could not install the peers' requirements:\n{done.stderr[-2000:]}")
    installed.write_text(wanted)
    return str(python)


def peer_versions() -> str:
    """The pinned frameworks of the peers, for the report: `fastapi 0.165.0, ...`."""
    pins = []
    for line in PEER_REQUIREMENTS.read_text().splitlines():
        name, _, version = line.partition("==")
        if version and name in ("fastapi", "advanced-alchemy", "sqlmodel"):
            pins.append(f"{name} {version}")
    return ", ".join(pins)


def web_command() -> str:
    """The Procfile's `web:` command, run through a shell as a platform does."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return command.strip()
    raise SystemExit("the Procfile has no web: command")


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for one server we start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """The checked-out commit, `-dirty` when the tree has changes: what was measured."""
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    return done.stdout.strip() or "unknown"


def load_average() -> float:
    """The 1-minute load average: above ~1 on this box means others shared the cores."""
    return os.getloadavg()[0]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[contextlib.ExitStack]:
    """An ExitStack that also unwinds on SIGTERM/SIGHUP (and on SIGINT even when started
    from a shell that ignores it), and is not cut short by a second signal while it
    stops servers and drops databases."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    stack = contextlib.ExitStack()
    try:
        yield stack
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# -- databases -----------------------------------------------------------------------


def database_url(name: str) -> str:
    return f"{PG_URL}/{name}"


async def _execute(database: str, *statements: str) -> None:
    import asyncpg  # only in the venv; see the module docstring

    connection = await asyncpg.connect(database_url(database))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


def admin(*statements: str) -> None:
    """Statements that cannot run inside the benchmarked databases (CREATE/DROP/ALTER
    DATABASE), one at a time on the maintenance database."""
    asyncio.run(_execute("postgres", *statements))


def drop_database(name: str) -> None:
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def seed_rows(count: int) -> list[SeedRow]:
    """The same users for every database, created a second apart so pages are stable."""
    start = datetime.now(UTC) - timedelta(seconds=count)
    rows = []
    for i in range(count):
        at = start + timedelta(seconds=i)
        email = f"seed{i}@bench.example.org"
        rows.append(
            (uuid.uuid4(), f"user{i}", email, "Seed", f"User{i}", "user", False, None, at, at)
        )
    return rows


async def _seed(database: str, rows: Sequence[SeedRow]) -> None:
    import asyncpg  # only in the venv; see the module docstring

    connection = await asyncpg.connect(database_url(database))
    try:
        columns = [
            "uid", "username", "email", "first_name", "last_name", "role",
            "is_verified", "verified_at", "created_at", "updated_at",
        ]  # fmt: skip
        await connection.copy_records_to_table("users", records=rows, columns=columns)
        await connection.execute("ANALYZE users")
    finally:
        await connection.close()


def prepare_database(name: str, rows: Sequence[SeedRow]) -> None:
    """Fresh database, the service's own init-db (its tables and indexes), then the seed."""
    admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    env = service_env(database_url(name), port=8000)  # init-db binds nothing
    done = subprocess.run(
        [sys.executable, "-m", "service", "init-db"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"init-db failed on {name}:\n{done.stderr[-2000:]}")
    asyncio.run(_seed(name, rows))


def fresh_database(stack: contextlib.ExitStack, name: str, rows: Sequence[SeedRow]) -> str:
    """A seeded database that is dropped when `stack` unwinds, also on Ctrl-C."""
    stack.callback(drop_database, name)
    prepare_database(name, rows)
    return name


# -- processes -----------------------------------------------------------------------


@dataclass
class Server:
    """A process we started, in its own process group so we can stop its whole tree."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def service_env(
    url: str, *, port: int, workers: int = 1, pgbouncer: bool = False
) -> dict[str, str]:
    """Every variable that shapes the comparison, set explicitly, so neither the caller's
    environment nor a .env in the repo (which the service reads) can skew it. This
    interpreter's bin goes first on PATH, so the Procfile's `python` is the venv's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "PATH": path,
        "DATABASE_URL": url,
        "DATABASE_CONNECTION_POOL_URL": "",  # would take precedence over DATABASE_URL
        "DB_PGBOUNCER": "true" if pgbouncer else "false",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "LOG_LEVEL": "warning",
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": str(MAX_OVERFLOW),
        "DB_POOL_TIMEOUT": "5",
        "DB_STATEMENT_TIMEOUT_MS": "15000",
        "MAX_BODY_BYTES": "1048576",
        "INIT_DB": "true",
        "API_KEYS": "",  # keys would turn every benchmarked request into a 401
    }


def spawn(name: str, command: list[str], env: dict[str, str], port: int, logs: Path) -> Server:
    """Output to a log file (a full pipe would stall the server), in a new session."""
    log_path = logs / f"{name}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    return Server(name, port, process, log_path)


def start_service(
    url: str, logs: Path, *, workers: int = 1, pgbouncer: bool = False, name: str = "service"
) -> Server:
    """The service exactly as a platform runs it: the Procfile's web command."""
    port = free_port()
    env = service_env(url, port=port, workers=workers, pgbouncer=pgbouncer)
    return spawn(name, ["/bin/sh", "-c", web_command()], env, port, logs)


def start_uvicorn(
    name: str, app: str, url: str, logs: Path, *, python: str = sys.executable
) -> Server:
    """A reference app from bench/ under one uvicorn worker, with the service's settings;
    `python` is the interpreter of the venv it runs in (the project's by default)."""
    port = free_port()
    command = [
        python, "-m", "uvicorn", app, "--app-dir", str(BENCH),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--log-level", "warning", "--no-access-log", "--no-server-header",
    ]  # fmt: skip
    return spawn(name, command, service_env(url, port=port), port, logs)


def get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """One GET on a new connection; None while nothing listens or it fails."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        connection.close()


def get_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    answer = get(port, path, timeout)
    return answer[0] if answer is not None else None


def wait_ready(server: Server, path: str, *, poll_seconds: float = 0.05) -> float:
    """Seconds until `path` answers 200; fails fast, with the log, if the process dies."""
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_SECONDS:
        if get_status(server.port, path) == 200:
            return time.perf_counter() - started
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        time.sleep(poll_seconds)
    raise RuntimeError(f"{server.name} gave no 200 on {path} within {READY_TIMEOUT_SECONDS} s")


def stop(server: Server) -> None:
    """SIGTERM to the whole group (graceful shutdown), SIGKILL if it outlives the grace."""
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


def started(stack: contextlib.ExitStack, server: Server) -> Server:
    """`server`, stopped when `stack` unwinds."""
    stack.callback(stop, server)
    return server


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants, parents before children."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            with contextlib.suppress(OSError):
                tree.extend(int(child) for child in (task / "children").read_text().split())
        index += 1
    return tree


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state (0A) on `port`, to find who holds the socket."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def server_pid(server: Server) -> int:
    """The uvicorn process of the Procfile's tree: the deepest one holding the listening
    socket (sh may exec python or fork it; with more workers, one of the workers)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(server.port)}
    for pid in reversed(_process_tree(server.process.pid)):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in wanted for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
    raise RuntimeError(f"no process of {server.name} listens on {server.port}")


def wait_until_settled(server: Server, *, timeout: float = 15.0) -> None:
    """Until the server's whole process tree is nearly idle: with several workers, the
    first 200 comes from one of them while the others may still be importing the
    app, which would steal CPU from a measured run."""
    window = 0.25
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        before = tree_cpu_seconds(server.process.pid)
        time.sleep(window)
        if tree_cpu_seconds(server.process.pid) - before < 0.1 * window:
            return


def tree_cpu_seconds(pid: int) -> float:
    """CPU time used so far by pid and its descendants (every worker of a server)."""
    total = 0.0
    for member in _process_tree(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


# -- reports -------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub table; a column whose cells all start with a number is right-aligned."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    align = ["---:" if column and all(map(_is_number, column)) else "---" for column in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _is_number(cell: str) -> bool:
    cell = cell.lstrip("*")  # a bold figure is still a figure
    return cell == "" or cell[0].isdigit() or cell[0] in "+-"
