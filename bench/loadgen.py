"""What wrk sends: the workloads, their Lua scripts, and one run of wrk.

Every script ends in a `done()` that prints one machine-readable `BENCH {...}`
line, so nothing depends on the layout of wrk's human-readable summary.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONNECTIONS, THREADS = 32, 2
WRK_TIMEOUT = "10s"  # above any latency we expect, so slow requests count in p99

SERVICE, BASELINE, BARE = "service", "baseline", "bare"
# The two designs a user would pick instead of the service (bench/peer_*.py).
SEED, ADVANCED_ALCHEMY = "seed", "advanced-alchemy"
PEERS = (SEED, ADVANCED_ALCHEMY)


@dataclass(frozen=True)
class Workload:
    """What wrk sends, which targets get it, and the issue's goal for the service."""

    name: str
    path: str  # the URL path; a script's request() may override it
    script: str  # Lua that generates requests ("" for the static path)
    reference: str  # the target the service is compared with
    goal: float  # the service's req/s must be at least goal x the reference's
    targets: tuple[str, ...] = (SERVICE, BASELINE, *PEERS)
    method: str = "GET"


READ_LUA = """
request = function()
  return wrk.format("GET", "/users/" .. uids[math.random(#uids)])
end
"""
WRITE_LUA = """
local counter = 0
local json_headers = {["Content-Type"] = "application/json"}
request = function()
  counter = counter + 1
  local body = string.format(
    '{"username":"bench","email":"w-%s-%d-%d@bench.example.org",'
    .. '"first_name":"Bench","last_name":"Writer"}', tag, tid, counter)
  return wrk.format("POST", "/users", json_headers, body)
end
"""
# 40 % reads, 20 % writes, 10 % lists, 20 % live, 10 % health: every path, for leaks.
MIXED_LUA = (
    WRITE_LUA.replace("request = function", "local write = function")
    + """
local n = 0
local list = wrk.format("GET", "/users?limit=50")
local live = wrk.format("GET", "/health/live")
local health = wrk.format("GET", "/health")
request = function()
  n = n + 1
  local k = n % 10
  if k < 4 then return wrk.format("GET", "/users/" .. uids[math.random(#uids)]) end
  if k < 6 then return write() end
  if k < 7 then return list end
  if k < 9 then return live end
  return health
end
"""
)
MIXED_DESCRIPTION = "40 % read, 20 % write, 10 % list, 20 % live, 10 % health"
# Every script: a thread id and a run tag (unique emails), and a machine-readable summary.
COMMON_LUA = """
local threads = 0
tid = 0
tag = "run"
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  tag = args[1] or tag
  math.randomseed(os.time() * 100 + tid)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%.0f,"p99_us":%.0f,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

WORKLOADS = (
    Workload("read", "/users/{uid}", READ_LUA, BASELINE, 0.5),
    Workload("write", "/users", WRITE_LUA, BASELINE, 0.4, method="POST"),
    Workload("list", "/users?limit=50", "", BASELINE, 0.5),
    Workload("live", "/health/live", "", BARE, 0.95, (SERVICE, BASELINE, BARE, *PEERS)),
    Workload("health", "/health", "", BASELINE, 0.5),
)
WORKLOADS_BY_NAME = {workload.name: workload for workload in WORKLOADS}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk counts statuses above 399
    socket_errors: int  # connect, read and write errors and timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def write_scripts(directory: Path, uids: Sequence[str]) -> dict[str, Path]:
    """One Lua file per workload (plus `mixed`), each with the seeded uids to read."""
    uid_table = "uids = {" + ",".join(f'"{uid}"' for uid in uids) + "}\n"
    sources = {workload.name: workload.script for workload in WORKLOADS}
    sources["mixed"] = MIXED_LUA
    scripts = {}
    for name, source in sources.items():
        path = directory / f"{name}.lua"
        path.write_text(uid_table + COMMON_LUA + source)
        scripts[name] = path
    return scripts


def url_for(base_url: str, workload: Workload) -> str:
    """The URL wrk is given; for scripted workloads the script picks the real path."""
    return base_url + workload.path.replace("{uid}", "")


def run_wrk(wrk: str, url: str, script: Path, seconds: int, tag: str) -> WrkResult:
    """One wrk run at the benchmark's concurrency; `tag` keeps written emails unique."""
    command = [
        wrk, f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", WRK_TIMEOUT,
        "-s", str(script), url, "--", tag,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    data = json.loads(line.removeprefix("BENCH "))
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non_2xx=data["status"],
        socket_errors=sum(data[key] for key in ("connect", "read", "write", "timeout")),
    )


def describe(result: WrkResult) -> str:
    """One progress line's worth of a run."""
    return (
        f"{result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:7.2f} ms  "
        f"errors {result.non_2xx} non-2xx, {result.socket_errors} socket"
    )
