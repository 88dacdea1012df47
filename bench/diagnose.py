"""Where a request's time goes: database round trips per request, and py-spy
profiles of the service under load.

    .venv/bin/python bench/diagnose.py [--workloads read write] [--seconds 8]

On a fresh seeded database it

1. counts round trips, straight to PostgreSQL and through PgBouncer: with
   `log_min_duration_statement = 0` set on that database only, it sends each
   kind of request a few times, one at a time after a warm-up, and reads what
   PostgreSQL logged for it (every statement, every extended-protocol execute
   and every prepare sent on its own is one round trip);
2. measures CPU per request: the uvicorn process's user+system CPU time over a
   wrk run, divided by the requests served, for the service and its reference
   (the baseline, or the bare app for `live`);
3. profiles: `py-spy record -r 250 -f raw` on the service's worker while wrk
   loads it, summarised as the share of samples per layer (by the innermost
   frame) and the top inclusive frames. The raw profiles are kept in bench/out/.

The report goes to stdout and bench/out/diagnose-<ts>.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from harness import (
    OUT,
    ROOT,
    VENV,
    Server,
    admin,
    cleanup_on_exit,
    cpu_model,
    cpu_seconds,
    database_url,
    ensure_tool,
    fresh_database,
    git_commit,
    load_average,
    log,
    markdown_table,
    reexec_in_venv,
    seed_rows,
    server_pid,
    start_service,
    start_uvicorn,
    started,
    stop,
    wait_ready,
)
from loadgen import (
    BARE,
    BASELINE,
    CONNECTIONS,
    SERVICE,
    WORKLOADS_BY_NAME,
    Workload,
    describe,
    run_wrk,
    url_for,
    write_scripts,
)
from scale import running_bouncer

SAMPLE_RATE = 250  # per second, as py-spy's -r
PROFILE_LEAD_SECONDS = 1.5  # wrk runs this long before py-spy attaches, and after it ends
LOG_SETTLE_SECONDS = 0.3  # PostgreSQL writes a statement's log line as it completes
POSTGRES_LOGS = Path("/var/log/postgresql")
TOP_FRAMES = 30
TOP_OWN = 12
# A logged statement: "LOG:  duration: 0.05 ms  execute __asyncpg_stmt_3__: SELECT ..."
LOGGED = re.compile(r"LOG:  duration: [\d.]+ ms  (statement|parse|bind|execute)( [^:]*)?: (\S+)")


@dataclass(frozen=True)
class Probe:
    """One kind of request for the round-trip count."""

    name: str
    method: str
    path: str
    body: Callable[[int], str] | None = None  # request number -> JSON body


def probes(uid: str) -> list[Probe]:
    """Every kind of request the performance issue names, plus a nested list and an
    update, which show the existence check and the locking read."""

    def new_user(n: int) -> str:
        email = f"diag-{n}-{time.monotonic_ns()}@bench.example.org"
        return json.dumps({"username": "d", "email": email, "first_name": "D", "last_name": "G"})

    return [
        Probe("read", "GET", f"/users/{uid}"),
        Probe("list", "GET", "/users?limit=50"),
        Probe("nested list", "GET", f"/users/{uid}/conversations"),
        Probe("write", "POST", "/users", new_user),
        Probe("update", "PATCH", f"/users/{uid}", lambda n: json.dumps({"first_name": f"D{n}"})),
        Probe("health", "GET", "/health"),
        Probe("live", "GET", "/health/live"),
    ]


# -- round trips ---------------------------------------------------------------------


def postgres_log() -> Path | None:
    """The server log as Debian's pg_ctlcluster writes it (stderr to one file)."""
    with contextlib.suppress(OSError):
        logs = sorted(POSTGRES_LOGS.glob("postgresql-*.log"), key=lambda p: p.stat().st_mtime)
        if logs and os.access(logs[-1], os.R_OK):
            return logs[-1]
    return None


def send(port: int, probe: Probe, number: int) -> int:
    """One request on its own connection; the status, once the body is read."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = probe.body(number) if probe.body else None
        headers = {"Content-Type": "application/json"} if body else {}
        connection.request(probe.method, probe.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def logged_statements(log_path: Path, offset: int, database: str) -> list[str]:
    """What PostgreSQL logged for `database` since `offset`, one entry per round trip:
    a simple statement ("BEGIN"), an extended-protocol execute ("SELECT"), or a
    prepare that was a round trip of its own ("prepare SELECT"). An unnamed parse
    directly followed by its bind went in the execute's batch, so it is not one."""
    with log_path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    entries = [
        (match[1], (match[2] or "").strip(), match[3].rstrip(";").upper())
        for line in text.splitlines()
        if f"@{database} " in line and (match := LOGGED.search(line))
    ]
    trips = []
    for index, (kind, name, verb) in enumerate(entries):
        following = entries[index + 1][0] if index + 1 < len(entries) else None
        if kind in ("statement", "execute"):
            trips.append(verb)
        elif kind == "parse" and (name != "<unnamed>" or following != "bind"):
            trips.append(f"prepare {verb}")
    return trips


def count_round_trips(server: Server, database: str, uid: str, repeats: int) -> list[list[str]]:
    """Per probe: its name, the status, the round trips of each repeat and what they were."""
    log_path = postgres_log()
    if log_path is None:
        return [["(PostgreSQL's log is not readable here)", "", "", ""]]
    rows = []
    for probe in probes(uid):
        for number in range(3):  # warm-up: prepared statements, compiled SQL, pool
            send(server.port, probe, -number - 1)
        counts, statuses, seen = [], set(), []
        for number in range(repeats):
            time.sleep(LOG_SETTLE_SECONDS)
            offset = log_path.stat().st_size
            statuses.add(send(server.port, probe, number))
            time.sleep(LOG_SETTLE_SECONDS)
            seen = logged_statements(log_path, offset, database)
            counts.append(len(seen))
        trips = ", ".join(str(c) for c in sorted(set(counts)))
        rows.append([
            f"{probe.method} {probe.path.split('?')[0]} ({probe.name})",
            "/".join(map(str, sorted(statuses))),
            trips,
            ", ".join(seen) or "none",
        ])  # fmt: skip
    return rows


def count_with_fresh_service(
    stack: contextlib.ExitStack,
    database: str,
    url: str,
    uid: str,
    repeats: int,
    logs: Path,
) -> list[list[str]]:
    """Round trips of a service started now (so its connections log statements) on
    `url`; a URL other than the database's own is PgBouncer's (DB_PGBOUNCER=true)."""
    pgbouncer = url != database_url(database)
    server = started(stack, start_service(url, logs, pgbouncer=pgbouncer, name="counting"))
    try:
        wait_ready(server, "/health")
        return count_round_trips(server, database, uid, repeats)
    finally:
        stop(server)


# -- CPU per request and profiles ----------------------------------------------------


@dataclass(frozen=True)
class CpuCost:
    rps: float
    cpu_ms_per_request: float
    utilisation: float  # CPU seconds per wall second of the one process


def cpu_cost(wrk: str, server: Server, script: Path, url: str, seconds: int) -> CpuCost:
    """CPU time the server's process spent per request over one wrk run."""
    pid = server_pid(server)
    before, began = cpu_seconds(pid), time.perf_counter()
    result = run_wrk(wrk, url, script, seconds, f"cpu-{server.name}-{time.monotonic_ns()}")
    used, wall = cpu_seconds(pid) - before, time.perf_counter() - began
    log(f"{server.name:8} {describe(result)}  {used / result.requests * 1000:.2f} ms CPU/request")
    return CpuCost(result.rps, used / result.requests * 1000, used / wall)


def record_profile(
    wrk: str, server: Server, script: Path, url: str, seconds: int, out: Path
) -> int:
    """py-spy on the worker for `seconds` while wrk loads it, from before py-spy
    attaches until after it ends; returns the requests per second wrk saw."""
    pid = server_pid(server)
    wrk_seconds = seconds + 2 * math.ceil(PROFILE_LEAD_SECONDS)
    rates: list[float] = []

    def load() -> None:
        tag = f"profile-{time.monotonic_ns()}"
        rates.append(run_wrk(wrk, url, script, wrk_seconds, tag).rps)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(PROFILE_LEAD_SECONDS)
    subprocess.run(
        [str(VENV / "bin" / "py-spy"), "record", "-p", str(pid), "-d", str(seconds),
         "-r", str(SAMPLE_RATE), "-f", "raw", "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    loader.join()
    return round(rates[0]) if rates else 0


@dataclass(frozen=True)
class Profile:
    samples: int
    expected: int  # rate x duration: what a worker busy all the time would give
    layers: list[tuple[str, float]]  # (package, % of samples) by innermost frame
    frames: list[tuple[str, float]]  # (frame, % of samples) inclusive
    own: list[tuple[str, float]]  # (frame, % of samples) as the innermost frame


def _frame_name(frame: str) -> str:
    """ "f (pkg/mod.py:12)" -> "f (pkg/mod.py)": lines would split one function's time."""
    return re.sub(r":\d+\)$", ")", frame)


def _package(frame: str) -> str:
    if not frame:
        return "(native code, no Python frame)"
    location = frame[frame.rfind("(") + 1 : -1]
    top = location.split("/")[0]
    return top.removesuffix(".py").split(":")[0]


def summarise_profile(path: Path, seconds: int) -> Profile:
    """Self time by package, and inclusive time by frame minus the frames every main
    stack shares (the runner chain). SQLAlchemy's sync code runs in greenlets, which
    py-spy shows as stacks of their own; they are counted as one pseudo-frame too."""
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks.append(([_frame_name(f) for f in stack.split(";")], int(count)))
    total = sum(count for _, count in stacks) or 1
    layers: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    main_total, greenlet = 0, 0
    for frames, count in stacks:
        layers[_package(frames[-1])] += count
        own[frames[-1] or "(native code, no Python frame)"] += count
        inclusive.update(dict.fromkeys(set(frames), count))
        if frames[0].startswith("_run_module_as_main"):
            main_total += count
        else:
            greenlet += count
    inclusive["[greenlet stacks: SQLAlchemy's sync ORM/Core code]"] = greenlet
    frames = [
        (name, count * 100 / total)
        for name, count in inclusive.most_common()
        if count != main_total and name
    ][:TOP_FRAMES]
    return Profile(
        samples=total,
        expected=SAMPLE_RATE * seconds,
        layers=[(name, count * 100 / total) for name, count in layers.most_common()],
        frames=frames,
        own=[(name, count * 100 / total) for name, count in own.most_common(TOP_OWN)],
    )


# -- report --------------------------------------------------------------------------


def profile_section(
    workload: Workload, profile: Profile, service: CpuCost, reference: CpuCost, rps: int, raw: Path
) -> list[str]:
    """One workload: CPU per request against its reference, then the profile's tables.
    When both processes are CPU-bound, their req/s ratio is about the inverse of
    their CPU-per-request ratio, so the goal sets a CPU budget per request."""
    busy = min(profile.samples / profile.expected * 100, 100.0)
    budget = reference.cpu_ms_per_request / workload.goal
    layers = [(n, p) for n, p in profile.layers if p >= 1.0]
    rest = 100 - sum(p for _, p in layers)
    return [
        f"### {workload.name} ({workload.path})",
        "",
        f"- CPU per request (wrk alone, no profiler): service {service.cpu_ms_per_request:.2f} "
        f"ms at {service.rps:.0f} req/s (on a core {service.utilisation * 100:.0f} % of the "
        f"time); {workload.reference} {reference.cpu_ms_per_request:.2f} ms at "
        f"{reference.rps:.0f} req/s ({reference.utilisation * 100:.0f} %): the service needs "
        f"{service.cpu_ms_per_request / reference.cpu_ms_per_request:.1f}x the CPU per request; "
        f"the goal ({workload.goal}x the {workload.reference}'s req/s) means at most about "
        f"{budget:.2f} ms",
        f"- profile: {profile.samples} samples of {profile.expected} possible at {SAMPLE_RATE} "
        f"Hz while serving {rps} req/s: py-spy found the worker active (running or waiting "
        f"for a core) in {busy:.0f} % of them, idle in {100 - busy:.0f} %; raw stacks in "
        f"{raw.relative_to(ROOT)}",
        "",
        *markdown_table(
            ["layer (innermost frame)", "% of samples"],
            [[n, f"{p:.1f}"] for n, p in layers] + [["other (< 1 % each)", f"{rest:.1f}"]],
        ),
        "",
        *markdown_table(
            ["inclusive frame", "% of samples"], [[f"`{n}`", f"{p:.1f}"] for n, p in profile.frames]
        ),
        "",
        *markdown_table(
            ["innermost frame (own time)", "% of samples"],
            [[f"`{n}`", f"{p:.1f}"] for n, p in profile.own],
        ),
        "",
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["read", "write"],
        choices=sorted(WORKLOADS_BY_NAME),
        help="workloads to profile (default read write)",
    )
    parser.add_argument("--seconds", type=int, default=8, help="py-spy duration (default 8)")
    parser.add_argument("--users", type=int, default=3000, help="seeded users (default 3000)")
    parser.add_argument("--repeats", type=int, default=5, help="requests per round-trip probe")
    return parser.parse_args()


def diagnose(args: argparse.Namespace, stack: contextlib.ExitStack, stamp: str) -> str:
    load_at_start, commit = load_average(), git_commit()
    wrk = ensure_tool("wrk", "wrk")
    logs = OUT / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    rows = seed_rows(args.users)
    uid = str(rows[0][0])
    database = fresh_database(stack, f"bench_diag_{stamp.lower()}", rows)
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-diag-")))
    scripts = write_scripts(scratch, [str(row[0]) for row in rows])

    # Statement logging only while counting: it costs PostgreSQL time under load.
    admin(f'ALTER DATABASE "{database}" SET log_min_duration_statement = 0')
    trips = count_with_fresh_service(
        stack, database, database_url(database), uid, args.repeats, logs
    )
    with running_bouncer(database) as bounced_url:
        bounced = count_with_fresh_service(stack, database, bounced_url, uid, args.repeats, logs)
    admin(f'ALTER DATABASE "{database}" RESET log_min_duration_statement')
    log("round trips counted")

    url = database_url(database)
    servers = {
        SERVICE: started(stack, start_service(url, logs)),
        BASELINE: started(stack, start_uvicorn(BASELINE, "baseline_app:app", url, logs)),
        BARE: started(stack, start_uvicorn(BARE, "bare_app:app", url, logs)),
    }
    for server in servers.values():
        wait_ready(server, "/health/live")
    service = servers[SERVICE]
    sections = []
    for name in args.workloads:
        workload, script = WORKLOADS_BY_NAME[name], scripts[name]
        costs = [
            cpu_cost(wrk, server, script, url_for(server.url, workload), args.seconds)
            for server in (service, servers[workload.reference])
        ]
        raw = OUT / f"profile-{name}-{stamp}.txt"
        rps = record_profile(
            wrk, service, script, url_for(service.url, workload), args.seconds, raw
        )
        profile = summarise_profile(raw, args.seconds)
        sections += profile_section(workload, profile, *costs, rps, raw)
    return "\n".join([
        f"# Diagnosis {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- machine: {cpu_model()}; commit {commit}; one uvicorn worker, pool 5+5, "
        f"wrk {CONNECTIONS} connections; load average {load_at_start:.2f} at start, "
        f"{load_average():.2f} at end",
        "",
        "## Round trips per request (after a warm-up)",
        "",
        *markdown_table(["request", "status", "round trips", "statements"], trips),
        "",
        "Through PgBouncer in transaction mode (DB_PGBOUNCER=true: no statement cache, so "
        "asyncpg prepares an unnamed statement in a round trip of its own before each "
        "execute; a SET logged here is one PgBouncer sent, not the service):",
        "",
        *markdown_table(["request", "status", "round trips", "statements"], bounced),
        "",
        "## Profiles of the service under wrk",
        "",
        *sections,
    ])  # fmt: skip


def main() -> int:
    reexec_in_venv()
    args = parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with cleanup_on_exit() as stack:
        text = diagnose(args, stack, stamp)
    print(text)
    path = OUT / f"diagnose-{stamp}.md"
    path.write_text(text)
    log(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped and the database dropped")
        sys.exit(130)
