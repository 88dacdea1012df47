"""Read replicas: the same read load with 0 and 1 replica, and the cost of routing.

    .venv/bin/python bench/replicas.py --seconds 5 --rounds 3   (from the repo root)

It starts a throw-away primary and streaming replica (tests/replica_cluster.py:
initdb + pg_basebackup -R), seeds users through the service, then loads
GET /users/{uid} with wrk against the service without replicas and with the
replica, in interleaved rounds (medians are printed). For each run: req/s,
the primary's CPU seconds per 1,000 reads (the postmaster and its backends)
and the share of reads the replica served (from `pg_stat_database.xact_commit`
on each server; autocommit reads count one each). Last, in process, the
microseconds `DBSessionMiddleware` spends choosing where a read goes: parsing
the token (none, header, cookie) and `choose()`.
Everything runs on this machine's cores, so the replica competes with the
primary for CPU: the throughput ratio says little about separate hosts, the
primary CPU per read says how much work moved off it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

from harness import (
    ROOT,
    Server,
    ensure_tool,
    free_port,
    log,
    reexec_in_venv,
    service_env,
    spawn,
    stop,
    tree_cpu_seconds,
    wait_ready,
    web_command,
)
from loadgen import describe, run_wrk, write_scripts

reexec_in_venv()
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402

from service.config import Settings, normalize_database_url  # noqa: E402
from service.consistency import presented_token  # noqa: E402
from service.db import ReplicaSet  # noqa: E402
from tests.replica_cluster import Cluster, running_cluster  # noqa: E402

DATABASE = "bench_replicas"
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = $1"


async def _fetch(url: str, sql: str, *args: object) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


def in_database(url: str) -> str:
    return make_url(url).set(database=DATABASE).render_as_string(hide_password=False)


def fetch(url: str, sql: str, *args: object) -> object:
    return asyncio.run(_fetch(url, sql, *args))


def primary_cpu_seconds(cluster: Cluster) -> float:
    """CPU used so far by the primary's postmaster and every backend it forked."""
    pid = int((cluster.directory / "primary" / "postmaster.pid").read_text().split()[0])
    return tree_cpu_seconds(pid)


def start(env_extra: dict[str, str], url: str, logs: Path, name: str) -> Server:
    port = free_port()
    env = {**service_env(url, port=port), **env_extra}
    server = spawn(name, ["/bin/sh", "-c", web_command()], env, port, logs)
    wait_ready(server, "/health")
    return server


def wait_for_replica(server: Server) -> None:
    give_up_at = time.monotonic() + 30
    while time.monotonic() < give_up_at:
        replicas = httpx.get(f"{server.url}/health").json()["replicas"]
        if replicas and replicas[0]["status"] == "pass" and replicas[0]["lag_ms"] == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the replica did not catch up within 30 s")


def load(
    wrk: str, server: Server, script: Path, seconds: int, cluster: Cluster, urls: dict[str, str]
) -> dict[str, float]:
    commits_before = {role: fetch(url, COMMITS, DATABASE) for role, url in urls.items()}
    cpu_before = primary_cpu_seconds(cluster)
    result = run_wrk(wrk, server.url + "/", script, seconds, server.name)
    cpu = primary_cpu_seconds(cluster) - cpu_before
    commits = {
        role: float(fetch(url, COMMITS, DATABASE)) - float(commits_before[role])  # type: ignore[arg-type]
        for role, url in urls.items()
    }
    log(f"{server.name}: {describe(result)}")
    served = commits["primary"] + commits["replica"]
    return {
        "rps": result.rps,
        "errors": result.errors,
        "primary_cpu_per_1000": cpu / result.requests * 1000,
        "replica_share": commits["replica"] / served if served else 0.0,
    }


def routing_cost_us(cluster: Cluster) -> dict[str, float]:
    """Per read: `presented_token(Headers(scope))` then `choose()`, as the middleware does."""
    settings = Settings(
        database_url=normalize_database_url(in_database(cluster.primary_url)),
        database_replica_urls=(normalize_database_url(in_database(cluster.replica_url)),),
    )

    async def measure() -> dict[str, float]:
        replicas = ReplicaSet.create(settings)
        try:
            await replicas.poll()
            token = f"{replicas.replicas[0].replayed >> 32:X}/0"
            scopes = {
                "no token": {"headers": []},
                "header token": {"headers": [(b"x-consistency-token", token.encode())]},
                "cookie token": {
                    "headers": [(b"cookie", f"a=b; consistency_token={token}".encode())]
                },
            }
            costs = {}
            for name, scope in scopes.items():
                assert replicas.choose(presented_token(Headers(scope=scope))) is not None

                def route(scope: dict[str, object] = scope) -> None:
                    replicas.choose(presented_token(Headers(scope=scope)))

                runs = timeit.repeat(route, number=20000, repeat=5)
                costs[name] = min(runs) / 20000 * 1e6
            return costs
        finally:
            for engine in replicas.engines():
                await engine.dispose()

    return asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="wrk run length")
    parser.add_argument("--users", type=int, default=200, help="users seeded and read")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, interleaved")
    args = parser.parse_args()
    wrk = ensure_tool("wrk", "wrk")
    with (
        running_cluster() as cluster,
        tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        logs = Path(tmp)
        fetch(cluster.primary_url, f'CREATE DATABASE "{DATABASE}"')
        urls = {
            "primary": in_database(cluster.primary_url),
            "replica": in_database(cluster.replica_url),
        }
        plain = start({}, urls["primary"], logs, "no-replica")
        stack.callback(stop, plain)
        with httpx.Client(base_url=plain.url) as client:
            uids = [
                client.post(
                    "/users",
                    json={
                        "username": "reader",
                        "email": f"r{n}@bench.example.org",
                        "first_name": "R",
                        "last_name": "R",
                    },
                ).json()["uid"]
                for n in range(args.users)
            ]
        script = write_scripts(logs, uids)["read"]
        replicated = start(
            {"DATABASE_REPLICA_URLS": urls["replica"]}, urls["primary"], logs, "one-replica"
        )
        stack.callback(stop, replicated)
        wait_for_replica(replicated)
        runs: dict[str, list[dict[str, float]]] = {"0 replicas": [], "1 replica": []}
        for _ in range(args.rounds):  # interleaved, so a busy minute hits both alike
            runs["0 replicas"].append(load(wrk, plain, script, args.seconds, cluster, urls))
            runs["1 replica"].append(load(wrk, replicated, script, args.seconds, cluster, urls))
        costs = routing_cost_us(cluster)
    medians = {
        name: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    print(
        f"reads: median of {args.rounds} interleaved {args.seconds} s wrk runs on "
        f"GET /users/{{uid}}, 1 worker, load average {os.getloadavg()[0]:.1f}:"
    )
    for name, figures in medians.items():
        print(
            f"  {name}: {figures['rps']:.0f} req/s, {figures['errors']:.0f} errors, "
            f"primary CPU {figures['primary_cpu_per_1000']:.3f} s per 1000 reads, "
            f"replica served {figures['replica_share']:.0%}"
        )
    without, with_replica = medians["0 replicas"], medians["1 replica"]
    print(f"  throughput, 1 replica / 0: {with_replica['rps'] / without['rps']:.2f}")
    print(
        "  primary CPU per read, 1 replica / 0: "
        f"{with_replica['primary_cpu_per_1000'] / without['primary_cpu_per_1000']:.2f}"
    )
    print("routing cost per read (token parsing + choose(), in process):")
    for name, cost in costs.items():
        print(f"  {name}: {cost:.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
