"""CPU instructions per request of the service, per workload, counted by callgrind.

Wall-clock req/s on a shared 2-core VM move by ±10 % between runs; the number of
instructions a request executes does not depend on what else runs, so this is how a
change to the request path is judged on its own. The app is driven in-process by a
minimal ASGI loop (no server, no HTTP parsing: those cost the same before and after)
against a fresh PostgreSQL database; PostgreSQL's own work is in another process and
not counted. Only the measured requests are instrumented (a tiny C shim issues
callgrind's client requests), so imports and warm-up cost neither time nor counts.

    .venv/bin/python bench/instructions.py                 # this tree
    .venv/bin/python bench/instructions.py --against main  # and the ratio to a git ref

Needs valgrind, its headers (valgrind/callgrind.h), a C compiler and PostgreSQL
(TEST_DATABASE_URL). ~1 minute per tree with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("read", "write", "list", "health", "live")
SHIM = r"""
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""

Message = dict[str, Any]


class Driver:
    """Sends requests to an ASGI app the way uvicorn would shape them, one at a time."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._lifespan_in: asyncio.Queue[Message] = asyncio.Queue()
        self._lifespan_out: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self._task = asyncio.create_task(
            self.app(scope, self._lifespan_in.get, self._lifespan_out.put)
        )
        await self._lifespan_in.put({"type": "lifespan.startup"})
        message = await self._lifespan_out.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")

    async def stop(self) -> None:
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        await self._lifespan_out.get()
        await self._task

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        path, _, query = target.partition("?")
        headers = [(b"host", b"bench"), (b"user-agent", b"bench"), (b"accept", b"*/*")]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": self.state.copy(),
        }
        sent: list[Message] = []
        received = False

        async def receive() -> Message:
            nonlocal received
            if received:
                await asyncio.Event().wait()  # no disconnect while the app works
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(
            m.get("body", b"") for m in sent if m["type"] == "http.response.body"
        )


def new_user() -> bytes:
    """A POST /users body like bench/run.py's (wrk's write script): a fresh email each."""
    key = uuid.uuid4().hex
    user = {
        "username": f"u{key}",
        "email": f"{key}@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
    }
    return json.dumps(user).encode()


async def measure(database_url: str, requests: int, warmup: int, workloads: list[str]) -> None:
    """Run each workload's requests, instrumented, one callgrind dump per workload."""
    import logging.config

    from service.app import create_app
    from service.config import Settings, normalize_database_url
    from service.logs import logging_config

    logging.config.dictConfig(logging_config("warning"))  # as bench/run.py's LOG_LEVEL
    shim = load_shim()
    driver = Driver(create_app(Settings(database_url=normalize_database_url(database_url))))
    await driver.start()
    uids = []
    for _ in range(100):
        status, body = await driver.request("POST", "/users", new_user())
        assert status == 201, (status, body)
        uids.append(json.loads(body)["uid"])
    calls: dict[str, Callable[[int], tuple[str, str, bytes]]] = {
        "read": lambda i: ("GET", f"/users/{uids[i % len(uids)]}", b""),
        "write": lambda i: ("POST", "/users", new_user()),
        "list": lambda i: ("GET", "/users?limit=50", b""),
        "health": lambda i: ("GET", "/health", b""),
        "live": lambda i: ("GET", "/health/live", b""),
    }
    bodies = {name: [calls[name](i) for i in range(warmup + requests)] for name in workloads}
    for name in workloads:
        for i in range(warmup):
            await driver.request(*bodies[name][i])
        shim.start()
        for i in range(warmup, warmup + requests):
            status, _ = await driver.request(*bodies[name][i])
            if status >= 300:
                raise RuntimeError(f"{name}: {status}")
        shim.stop()
    await driver.stop()


def load_shim() -> ctypes.CDLL:
    built = Path(os.environ["BENCH_SHIM"])
    return ctypes.CDLL(str(built))


def build_shim(directory: Path) -> Path:
    source = directory / "shim.c"
    source.write_text(SHIM)
    built = directory / "shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", built, source], check=True)
    return built


def run_tree(
    tree: Path, database_url: str, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    """Instructions per request of the service package in `tree`, under callgrind."""
    out = work / f"callgrind.{tree.name}"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "BENCH_SHIM": str(work / "shim.so"),
        "PYTHONHASHSEED": "0",
    }
    child = [
        sys.executable,
        __file__,
        "--child",
        database_url,
        str(args.requests),
        str(args.warmup),
    ]
    child.append(",".join(args.workloads))
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p",
            *child,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    dumps = sorted(
        work.glob(f"callgrind.{tree.name}.*.*"), key=lambda p: int(p.name.rsplit(".", 1)[1])
    )
    if len(dumps) != len(args.workloads):
        raise RuntimeError(f"expected {len(args.workloads)} dumps, found {[d.name for d in dumps]}")
    counts = {}
    for name, dump in zip(args.workloads, dumps, strict=True):
        totals = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.MULTILINE)
        if totals is None:
            raise RuntimeError(f"no totals in {dump}")
        counts[name] = int(totals.group(1)) / args.requests
    return counts


def checkout(ref: str, work: Path) -> Path:
    """The service package as it is at `ref`, in a directory of its own."""
    tree = work / re.sub(r"[^A-Za-z0-9]", "_", ref)
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", ref, "service"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against", metavar="REF", help="also measure this git ref; print after/before"
    )
    parser.add_argument("--requests", type=int, default=300, help="measured requests per workload")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, requests, warmup, workloads = args.child
        asyncio.run(measure(url, int(requests), int(warmup), workloads.split(",")))
        return 0
    sys.path.insert(0, str(ROOT))
    from tests.support import fresh_postgres_database

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_shim(work)
        trees = {"this tree": ROOT}
        if args.against:
            trees = {args.against: checkout(args.against, work), **trees}
        counts = {}
        for label, tree in trees.items():
            with fresh_postgres_database() as url:
                counts[label] = run_tree(tree, url, args, work)
    labels = list(counts)
    header = ["workload", *(f"{label} instr/req" for label in labels)]
    if args.against:
        header.append("after/before")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    for name in args.workloads:
        row = [name, *(f"{counts[label][name]:,.0f}" for label in labels)]
        if args.against:
            row.append(f"{counts['this tree'][name] / counts[args.against][name]:.3f}")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
