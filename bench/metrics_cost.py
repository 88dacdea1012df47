"""What the metrics cost: the service with METRICS_ENABLED=true against the same
service with it off, in one run, on /health/live and a read.

    .venv/bin/python bench/metrics_cost.py [--rounds 3] [--duration 5] [--workers 1]

Both run from the Procfile's `web:` command on one seeded database and are loaded
by wrk in interleaved rounds (the order flips every round, so a slow minute of
the machine hits both alike); both servers share one core and wrk has the
others. It prints the median req/s of each and the ratio
on/off per round and its median (the issue's goal: at least 0.95), and the CPU
time the server used per request, whose ratio off/on is the throughput one worker
could keep with metrics on. On a busy machine (see the load average printed) the
req/s of single rounds swing widely, while CPU per request stays steady.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from harness import (
    Server,
    cleanup_on_exit,
    database_url,
    ensure_tool,
    free_port,
    fresh_database,
    git_commit,
    load_average,
    log,
    markdown_table,
    reexec_in_venv,
    seed_rows,
    service_env,
    spawn,
    started,
    tree_cpu_seconds,
    wait_ready,
    wait_until_settled,
    web_command,
)
from loadgen import WORKLOADS_BY_NAME, WrkResult, describe, run_wrk, url_for, write_scripts

WORKLOADS = ("live", "read")
TARGETS = ("on", "off")
WARMUP_SECONDS = 2
GOAL = 0.95
# Servers on one core, this script and wrk on the others, when there are two or more.
PINNED = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
SERVER_CPU = 1

Run = tuple[WrkResult, float]  # wrk's figures, and server CPU microseconds per request


def start(name: str, url: str, logs: Path, *, enabled: bool, workers: int) -> Server:
    """Both servers on the same core (SERVER_CPU), so neither gets a better seat."""
    port = free_port()
    env = service_env(url, port=port, workers=workers)
    env["METRICS_ENABLED"] = "true" if enabled else "false"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the service's own default
    pin = ["taskset", "-c", str(SERVER_CPU)] if PINNED else []
    return spawn(name, [*pin, "/bin/sh", "-c", web_command()], env, port, logs)


def measure(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[str]:
    wrk = ensure_tool("wrk", "wrk")
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-metrics-")))
    rows = seed_rows(args.users)
    database = fresh_database(stack, f"bench_metrics_{os.getpid()}", rows)
    url = database_url(database)
    servers = {
        target: started(
            stack,
            start(f"metrics-{target}", url, scratch, enabled=target == "on", workers=args.workers),
        )
        for target in TARGETS
    }
    for server in servers.values():
        wait_ready(server, "/health")
        wait_until_settled(server)
    scripts = write_scripts(scratch, [str(row[0]) for row in rows])
    for name in WORKLOADS:
        for target in TARGETS:
            workload = WORKLOADS_BY_NAME[name]
            run_wrk(wrk, url_for(servers[target].url, workload), scripts[name], WARMUP_SECONDS, "w")
    loads = [load_average()]
    results: dict[tuple[str, str], list[Run]] = {}
    for number in range(args.rounds):
        for name in WORKLOADS:
            workload = WORKLOADS_BY_NAME[name]
            for target in TARGETS if number % 2 == 0 else TARGETS[::-1]:
                server = servers[target]
                cpu_before = tree_cpu_seconds(server.process.pid)
                result = run_wrk(
                    wrk, url_for(server.url, workload), scripts[name], args.duration, f"r{number}"
                )
                cpu_us = (tree_cpu_seconds(server.process.pid) - cpu_before) / result.requests
                results.setdefault((name, target), []).append((result, cpu_us * 1e6))
                log(f"{number + 1}/{args.rounds} {name:5} metrics {target:3} {describe(result)}")
        loads.append(load_average())
    return report(args, results, loads)


def report(
    args: argparse.Namespace, results: dict[tuple[str, str], list[Run]], loads: list[float]
) -> list[str]:
    rows = []
    for name in WORKLOADS:
        on, off = results[(name, "on")], results[(name, "off")]
        ratios = [a.rps / b.rps for (a, _), (b, _) in zip(on, off, strict=True)]
        cpu_on = statistics.median(cpu for _, cpu in on)
        cpu_off = statistics.median(cpu for _, cpu in off)
        rows.append([
            name,
            f"{statistics.median(r.rps for r, _ in on):.0f}",
            f"{statistics.median(r.rps for r, _ in off):.0f}",
            " ".join(f"{ratio:.3f}" for ratio in ratios),
            f"{statistics.median(ratios):.3f}",
            f"{cpu_on:.0f} / {cpu_off:.0f}",
            f"{cpu_off / cpu_on:.3f}",
            "met" if cpu_off / cpu_on >= GOAL else "missed",
        ])  # fmt: skip
    header = [
        "workload", "on req/s", "off req/s", "on/off per round", "median on/off",
        "CPU µs/request on / off", "CPU off/on", "goal 0.95 (CPU)",
    ]  # fmt: skip
    seat = f" on CPU {SERVER_CPU}" if PINNED else ""
    return [
        f"# Metrics cost ({git_commit()})",
        "",
        f"{args.workers} worker(s){seat}, {args.rounds} rounds of {args.duration} s per target "
        f"and workload; load average {' → '.join(f'{x:.1f}' for x in loads)}.",
        "",
        *markdown_table(header, rows),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--workers", type=int, default=1, help="WEB_CONCURRENCY of both")
    parser.add_argument("--users", type=int, default=1000, help="seeded users to read")
    return parser.parse_args()


def main() -> int:
    reexec_in_venv()
    args = parse_args()
    if PINNED:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) - {SERVER_CPU})  # wrk inherits
    with cleanup_on_exit() as stack:
        lines = measure(args, stack)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped and the database dropped")
        sys.exit(130)
