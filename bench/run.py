"""The service side by side with a hand-written baseline, a bare app and the two peers a
user would pick instead, and the service scaled out to several workers, direct and
through PgBouncer.

    .venv/bin/python bench/run.py           (from the repo root; re-runs itself in .venv)
    .venv/bin/python bench/run.py --quick   (a smoke test: every column, meaningless figures)

It installs wrk (and pgbouncer) if missing, and the peers' pinned requirements
(bench/peers-requirements.txt) into bench/.venv-peers; creates fresh databases on the
local PostgreSQL (one each for the service, the baseline, each peer, the scale-out),
runs the service's init-db and seeds the same users in each, then starts the service
from the Procfile's `web:` command with one worker, and `bench/baseline_app.py`,
`bench/bare_app.py`, `bench/peer_seed.py` (the seed's FastAPI + SQLModel design) and
`bench/peer_advanced_alchemy.py` (advanced-alchemy's Starlette extension) under
uvicorn. Every target is loaded with wrk in interleaved rounds (so a slow minute of
the machine hits every target alike); the first table is the performance issue's
(req/s per workload: raw or bare, the peers, the service, and the service's ratios),
the next gives the median req/s, p50 and p99 per target and workload, then the
verdicts against the issue's goals. It also measures the service's RSS growth over 100,000
more requests and the time from exec to the first 200 on /health, and ends with
the scale-out scenario (bench/scale.py: 1, 2 and 4 workers, direct and through
PgBouncer). Results go to stdout and bench/out/results-<ts>.md. Everything it
started is stopped and its databases dropped, also on Ctrl-C. bench/diagnose.py
explains the figures: round trips per request, CPU per request, py-spy profiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from harness import (
    MAX_OVERFLOW,
    OUT,
    POOL_SIZE,
    ROOT,
    SeedRow,
    Server,
    cleanup_on_exit,
    cpu_model,
    database_url,
    ensure_peer_venv,
    ensure_tool,
    fresh_database,
    get,
    get_status,
    git_commit,
    load_average,
    log,
    markdown_table,
    peer_versions,
    reexec_in_venv,
    rss_kib,
    seed_rows,
    server_pid,
    start_service,
    start_uvicorn,
    started,
    stop,
    wait_ready,
    web_command,
)
from loadgen import (
    ADVANCED_ALCHEMY,
    BARE,
    BASELINE,
    CONNECTIONS,
    PEERS,
    SEED,
    SERVICE,
    THREADS,
    WORKLOADS,
    Workload,
    WrkResult,
    describe,
    run_wrk,
    url_for,
    write_scripts,
)
from scale import run_scale_out, scale_section

WARMUP_SECONDS = 2
STARTUP_TRIALS = 3
P99_GOAL = 2.0  # the service's p99 at most this many times its reference's
PEER_GOAL = 1.3  # the service's req/s at least this many times each peer's
TAIL_GOAL = 3.0  # the service's p99 at most this many times its own p50 (issue 14), 0 errors
PEER_APPS = {SEED: "peer_seed:app", ADVANCED_ALCHEMY: "peer_advanced_alchemy:app"}
QUICK_WARNING = (
    "**--quick: a smoke test of the harness. One short round per target; these figures "
    "compare nothing.**"
)
RSS_GOAL_PERCENT = 5.0
FIRST_200_GOAL_SECONDS = 1.5

Results = dict[tuple[str, str], list[WrkResult]]  # (workload, target) -> one per round


@dataclass
class Context:
    """What the figures depend on besides the code: taken as the run goes, since other
    work on the machine (and other commits) can change while it runs."""

    commit: str
    loads: list[float]  # 1-minute load average at start and after each phase


# -- measurements --------------------------------------------------------------------


def run_rounds(
    wrk: str,
    servers: dict[str, Server],
    scripts: dict[str, Path],
    *,
    rounds: int,
    seconds: int,
    warmup: int,
    context: Context,
) -> Results:
    """A warm-up per pair, then rounds that alternate the order of targets, so
    drift in the machine's speed does not favour one of them."""
    for workload in WORKLOADS:
        for target in workload.targets:
            url = url_for(servers[target].url, workload)
            run_wrk(wrk, url, scripts[workload.name], warmup, f"warm-{target}")
    results: Results = {}
    for number in range(rounds):
        for workload in WORKLOADS:
            order = workload.targets if number % 2 == 0 else workload.targets[::-1]
            for target in order:
                url = url_for(servers[target].url, workload)
                result = run_wrk(wrk, url, scripts[workload.name], seconds, f"r{number}-{target}")
                results.setdefault((workload.name, target), []).append(result)
                log(f"round {number + 1}/{rounds} {workload.name:6} {target:16} {describe(result)}")
        context.loads.append(load_average())
    return results


@dataclass(frozen=True)
class RssResult:
    before_kib: int
    after_kib: int
    requests: int

    @property
    def growth_percent(self) -> float:
        return (self.after_kib - self.before_kib) / self.before_kib * 100


def measure_rss(wrk: str, server: Server, script: Path, total: int) -> RssResult:
    """VmRSS of the uvicorn process after a mixed warm-up, and after `total` more mixed
    requests (wrk runs by time, so it runs in chunks sized from the last rate)."""
    pid = server_pid(server)
    run_wrk(wrk, server.url + "/", script, 5, "rss-warm")
    before = rss_kib(pid)
    done, rate, chunk = 0, 1000.0, 0
    while done < total:
        seconds = max(1, min(15, math.ceil((total - done) / rate)))
        result = run_wrk(wrk, server.url + "/", script, seconds, f"rss-{chunk}")
        done, rate, chunk = done + result.requests, max(result.rps, 1.0), chunk + 1
    return RssResult(before, rss_kib(pid), done)


def time_first_200(database: str, logs: Path, trials: int) -> list[float]:
    """Seconds from exec of the Procfile's web command to the first 200 on /health,
    polled every few milliseconds, on a fresh process each trial."""
    timings = []
    for _ in range(trials):
        began = time.perf_counter()
        server = start_service(database_url(database), logs)
        try:
            while get_status(server.port, "/health", timeout=2.0) != 200:
                if server.process.poll() is not None or time.perf_counter() - began > 30:
                    raise RuntimeError(f"fresh service never answered; see {server.log}")
                time.sleep(0.005)
            timings.append(time.perf_counter() - began)
        finally:
            stop(server)
    return timings


def same_bodies(service: Server, baseline: Server, uid: str) -> list[str]:
    """Paths where the baseline's bytes differ from the service's. Both databases hold
    the same seed, so a read and a list must match byte for byte; if they do not,
    the baseline no longer does the service's work and its figures mean less."""
    differ = []
    for path in (f"/users/{uid}", "/users?limit=50"):
        if get(service.port, path) != get(baseline.port, path):
            differ.append(path)
    return differ


def _json_answer(server: Server, path: str) -> tuple[int, object] | None:
    answer = get(server.port, path)
    if answer is None:
        return None
    try:
        return answer[0], json.loads(answer[1])
    except ValueError:
        return answer[0], answer[1]


def same_json(service: Server, peer: Server, uid: str) -> list[str]:
    """Paths where a peer's status or JSON differs from the service's. Its framework
    may space or order the JSON its own way and send other headers, but the values
    must be the service's, or the peer is not doing the same work."""
    return [
        path
        for path in (f"/users/{uid}", "/users?limit=50")
        if _json_answer(service, path) != _json_answer(peer, path)
    ]


# -- report --------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def summarise(results: list[WrkResult]) -> Summary:
    """Medians over rounds; errors are summed, since any is worth seeing."""
    return Summary(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
    )


@dataclass(frozen=True)
class Comparison:
    """The service against its reference and the peers on one workload, and the issue's
    verdicts."""

    workload: Workload
    service: Summary
    reference: Summary
    peers: dict[str, Summary]

    @property
    def rps_ratio(self) -> float:
        return self.service.rps / self.reference.rps

    @property
    def p99_ratio(self) -> float:
        return self.service.p99_ms / self.reference.p99_ms

    @property
    def rps_ok(self) -> bool:
        return self.rps_ratio >= self.workload.goal

    @property
    def p99_ok(self) -> bool:
        return self.p99_ratio <= P99_GOAL

    @property
    def tail_ratio(self) -> float:
        return self.service.p99_ms / self.service.p50_ms

    def peer_ratio(self, peer: str) -> float:
        return self.service.rps / self.peers[peer].rps


def compare(summaries: dict[tuple[str, str], Summary]) -> list[Comparison]:
    return [
        Comparison(
            w,
            summaries[(w.name, SERVICE)],
            summaries[(w.name, w.reference)],
            {peer: summaries[(w.name, peer)] for peer in PEERS},
        )
        for w in WORKLOADS
    ]


def verdict(ok: bool) -> str:
    return "ok" if ok else "**MISSED**"


def _ratio(value: float, goal: float) -> str:
    """A ratio of req/s, in bold when it misses its goal."""
    text = f"{value:.2f}x"
    return text if value >= goal else f"**{text}**"


def issue_table(comparisons: list[Comparison]) -> list[str]:
    """The performance issue's table: req/s of raw asyncpg (bare Starlette for live), each
    peer and the service, and the service's ratio to each; a ratio under its goal
    (the ceiling's per workload, PEER_GOAL for the peers) is in bold."""
    rows = []
    for c in comparisons:
        workload = c.workload
        reference = f"{c.reference.rps:,.0f}" + (" (bare)" if workload.reference == BARE else "")
        rows.append([
            f"{workload.name} `{workload.method} {workload.path}`",
            reference,
            *(f"{c.peers[peer].rps:,.0f}" for peer in PEERS),
            f"{c.service.rps:,.0f}",
            _ratio(c.rps_ratio, workload.goal),
            *(_ratio(c.peer_ratio(peer), PEER_GOAL) for peer in PEERS),
        ])  # fmt: skip
    header = [
        "workload", "raw / bare", "seed design", "advanced-alchemy", "this service",
        "service vs raw", "vs seed", "vs advanced-alchemy",
    ]  # fmt: skip
    return markdown_table(header, rows)


def throughput_table(
    summaries: dict[tuple[str, str], Summary], comparisons: list[Comparison]
) -> list[str]:
    """Every target's figures, with the service's ratio on its own row."""
    rows = []
    for c in comparisons:
        for target in c.workload.targets:
            s = summaries[(c.workload.name, target)]
            ratio, goal = "", ""
            if target == SERVICE:
                ratio = f"{c.rps_ratio:.2f}x {c.workload.reference}"
                goal = f"≥ {c.workload.goal}x {verdict(c.rps_ok)}"
            rows.append([
                c.workload.name, target, f"{s.rps:.0f}", f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}",
                str(s.errors), ratio, goal,
            ])  # fmt: skip
    header = ["workload", "target", "req/s", "p50 ms", "p99 ms", "errors", "service/ref req/s"]
    return markdown_table([*header, "goal"], rows)


def checks_table(
    comparisons: list[Comparison], rss: RssResult | None, first_200: list[float]
) -> list[str]:
    """Each target of the issue on one line: what was measured, the goal, the verdict."""
    rows = [
        [
            f"{c.workload.name} req/s, service/{c.workload.reference}",
            f"{c.rps_ratio:.2f}x",
            f"≥ {c.workload.goal}x",
            verdict(c.rps_ok),
        ]
        for c in comparisons
    ]
    rows += [
        [
            f"{c.workload.name} req/s, service/{peer}",
            f"{c.peer_ratio(peer):.2f}x ({c.service.rps:.0f} vs {c.peers[peer].rps:.0f})",
            f"≥ {PEER_GOAL}x",
            verdict(c.peer_ratio(peer) >= PEER_GOAL),
        ]
        for c in comparisons
        for peer in PEERS
    ]
    rows += [
        [
            f"{c.workload.name} p99, service/{c.workload.reference}",
            f"{c.p99_ratio:.2f}x ({c.service.p99_ms:.1f} vs {c.reference.p99_ms:.1f} ms)",
            f"≤ {P99_GOAL}x",
            verdict(c.p99_ok),
        ]
        for c in comparisons
    ]
    rows += [
        [
            f"{c.workload.name} p99/p50 of the service, and its errors",
            f"{c.tail_ratio:.2f}x ({c.service.p99_ms:.1f} / {c.service.p50_ms:.1f} ms), "
            f"{c.service.errors} errors",
            f"≤ {TAIL_GOAL}x, 0 errors",
            verdict(c.tail_ratio <= TAIL_GOAL and c.service.errors == 0),
        ]
        for c in comparisons
    ]
    if rss is not None:
        rows.append([
            f"service RSS growth over {rss.requests:,} mixed requests",
            f"{rss.growth_percent:+.2f} % ({rss.before_kib / 1024:.1f} → "
            f"{rss.after_kib / 1024:.1f} MiB)",
            f"< {RSS_GOAL_PERCENT} %",
            verdict(rss.growth_percent < RSS_GOAL_PERCENT),
        ])  # fmt: skip
    if first_200:
        median = statistics.median(first_200)
        each = ", ".join(f"{t:.2f}" for t in first_200)
        rows.append([
            f"exec → first 200 on /health (median of {len(first_200)}: {each} s)",
            f"{median:.2f} s",
            f"≤ {FIRST_200_GOAL_SECONDS} s",
            verdict(median <= FIRST_200_GOAL_SECONDS),
        ])  # fmt: skip
    return markdown_table(["check", "measured", "goal", "verdict"], rows)


def parity_text(differ: dict[str, list[str]]) -> str:
    """Whether the baseline sent the service's bytes and the peers its JSON values."""
    if not any(differ.values()):
        return (
            "on a read and a list the baseline sends the service's bytes and the peers "
            "its JSON values"
        )
    return "; ".join(
        f"{target}'s {'bytes' if target == BASELINE else 'JSON'} DIFFER from the service's "
        f"on {', '.join(paths)}"
        for target, paths in differ.items()
        if paths
    )


def machine_lines(
    args: argparse.Namespace, context: Context, differ: dict[str, list[str]]
) -> list[str]:
    """What ran where, so a reader can judge how comparable two reports are."""
    cores = os.cpu_count()
    return [
        f"- machine: {cores} cores, {cpu_model()}; Python {sys.version.split()[0]}; "
        f"commit {context.commit}",
        f"- load: wrk, {CONNECTIONS} connections, {THREADS} threads, {args.duration} s per run, "
        f"{args.rounds} interleaved rounds (medians shown); pool {POOL_SIZE}+{MAX_OVERFLOW} "
        f"in every app; {args.users} seeded users; one uvicorn worker each; "
        f"{parity_text(differ)}",
        f"- service: Procfile `web: {web_command()}`, WEB_CONCURRENCY=1, LOG_LEVEL=warning",
        f"- peers (bench/peers-requirements.txt, in bench/.venv-peers): seed design = "
        f"bench/peer_seed.py, advanced-alchemy = bench/peer_advanced_alchemy.py; "
        f"{peer_versions()}",
        f"- 1-minute load average {context.loads[0]:.2f} at start; "
        f"{', '.join(f'{load:.2f}' for load in context.loads[1:])} after each round; "
        f"{load_average():.2f} at end (well above ~1 means other work shared the {cores} cores)",
    ]


def report(
    args: argparse.Namespace,
    context: Context,
    results: Results,
    rss: RssResult | None,
    first_200: list[float],
    differ: dict[str, list[str]],
    scale: list[str],
) -> str:
    summaries = {key: summarise(value) for key, value in results.items()}
    comparisons = compare(summaries)
    quick = [QUICK_WARNING, ""] if args.quick else []
    return "\n".join([
        f"# Benchmark {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        *quick,
        *machine_lines(args, context, differ),
        "",
        "req/s, medians over rounds (p50, p99 and errors per target in the next table):",
        "",
        *issue_table(comparisons),
        "",
        *throughput_table(summaries, comparisons),
        "",
        "errors: non-2xx responses plus socket errors and timeouts, summed over rounds "
        "(a 503 here usually means no pooled connection came free within DB_POOL_TIMEOUT).",
        "",
        *checks_table(comparisons, rss, first_200),
        "",
        *([*scale, ""] if scale else []),
    ])  # fmt: skip


# -- main ----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run (default 6)")
    parser.add_argument("--users", type=int, default=3000, help="seeded users (default 3000)")
    parser.add_argument(
        "--rss-requests", type=int, default=100_000, help="0 skips the RSS check (default 100000)"
    )
    parser.add_argument(
        "--scale-seconds",
        type=int,
        default=5,
        help="seconds per scale-out run, mixed workload (default 5)",
    )
    parser.add_argument(
        "--no-scale", action="store_true", help="skip the scale-out scenario (1, 2, 4 workers)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of the harness: 1 round of 2 s runs, 1 s warm-ups, one startup "
        "trial, no RSS check, no scale-out (overrides those options; ~2 minutes)",
    )
    args = parser.parse_args()
    args.warmup, args.startup_trials = WARMUP_SECONDS, STARTUP_TRIALS
    if args.quick:
        args.rounds, args.duration, args.warmup, args.startup_trials = 1, 2, 1, 1
        args.rss_requests, args.no_scale = 0, True
    return args


def start_targets(
    stack: contextlib.ExitStack, databases: dict[str, str], logs: Path, *, peer_python: str
) -> dict[str, Server]:
    """The service, the baseline, the bare app and the peers (in their own venv), each
    answering before it returns."""
    service_url, baseline_url = database_url(databases[SERVICE]), database_url(databases[BASELINE])
    servers = {
        SERVICE: started(stack, start_service(service_url, logs)),
        BASELINE: started(stack, start_uvicorn(BASELINE, "baseline_app:app", baseline_url, logs)),
        BARE: started(stack, start_uvicorn(BARE, "bare_app:app", baseline_url, logs)),
    }
    for peer, app in PEER_APPS.items():
        url = database_url(databases[peer])
        servers[peer] = started(stack, start_uvicorn(peer, app, url, logs, python=peer_python))
    for name, server in servers.items():
        wait_ready(server, "/health/live" if name == BARE else "/health")
    return servers


def scale_out(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    wrk: str,
    *,
    rows: list[SeedRow],
    script: Path,
    logs: Path,
) -> list[str]:
    """The scale-out scenario on its own database, so pg_stat_activity counts only it."""
    database = fresh_database(stack, f"bench_scale_{os.getpid()}", rows)
    load_before = load_average()
    results = run_scale_out(wrk, script, logs, database=database, seconds=args.scale_seconds)
    load = (load_before, load_average())
    return scale_section(results, seconds=args.scale_seconds, load=load)


def benchmark(args: argparse.Namespace, stack: contextlib.ExitStack, stamp: str) -> str:
    context = Context(commit=git_commit(), loads=[load_average()])
    wrk = ensure_tool("wrk", "wrk")
    peer_python = ensure_peer_venv()
    logs = OUT / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
    rows = seed_rows(args.users)
    databases = {
        name: fresh_database(stack, f"bench_{name.replace('-', '_')}_{os.getpid()}", rows)
        for name in (SERVICE, BASELINE, *PEERS)
    }
    log(f"seeded {args.users} users in {', '.join(databases.values())}")

    first_200 = time_first_200(databases[SERVICE], logs, args.startup_trials)
    log(f"exec → first 200 on /health: {', '.join(f'{t:.2f}' for t in first_200)} s")

    servers = start_targets(stack, databases, logs, peer_python=peer_python)
    log(f"service pid {server_pid(servers[SERVICE])}; logs in {logs}")
    uid = str(rows[0][0])
    differ = {BASELINE: same_bodies(servers[SERVICE], servers[BASELINE], uid)}
    differ |= {peer: same_json(servers[SERVICE], servers[peer], uid) for peer in PEERS}

    scripts = write_scripts(scratch, [str(row[0]) for row in rows])
    results = run_rounds(
        wrk, servers, scripts, rounds=args.rounds, seconds=args.duration, warmup=args.warmup,
        context=context,
    )  # fmt: skip

    rss = None
    if args.rss_requests > 0:
        rss = measure_rss(wrk, servers[SERVICE], scripts["mixed"], args.rss_requests)
        log(f"RSS {rss.before_kib} → {rss.after_kib} KiB over {rss.requests} requests")
    for server in servers.values():
        stop(server)  # idle, but their pools would hold connections during the scale-out

    scale = []
    if not args.no_scale:
        scale = scale_out(args, stack, wrk, rows=rows, script=scripts["mixed"], logs=logs)
    return report(args, context, results, rss, first_200, differ, scale)


def main() -> int:
    reexec_in_venv()
    args = parse_args()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with cleanup_on_exit() as stack:
        text = benchmark(args, stack, stamp)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"results-{stamp}.md"
    path.write_text(text)
    log(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped and the databases dropped")
        sys.exit(130)
