"""schemathesis against the real `web:` process on PostgreSQL, driven by the service's
own /openapi.json: whatever a client sends, the service answers without a 5xx, and
every answer is one the document describes (status code, content type, body).

schemathesis' pytest loader for fixtures (`schemathesis.pytest.from_fixture`) does
not run under pytest 9 (it sets `Function._nodeid`, which pytest 9 removed), and the
schema only exists once the service runs, so the tests draw cases from the documented
Hypothesis strategies (`operation.as_strategy`) and the state machine instead.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from schemathesis import APIOperation, Case, GenerationMode, Response
from schemathesis.checks import (
    CheckFunction,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup
from schemathesis.schemas import BaseSchema

from tests.factories import user_body
from tests.support import running_service

pytestmark = [pytest.mark.postgres, pytest.mark.process, pytest.mark.timeout(180)]

API_KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The promises under test. The other checks judge how much of the validation the
# schema can express (for example "prompt or response"), not what the service does.
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Together about 2 minutes on 2 cores: single calls to 26 operations, then scenarios.
EXAMPLES_PER_OPERATION = 100
STATEFUL_SCENARIOS = 150
STATEFUL_SECONDS = 45
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
STATEFUL_SETTINGS = settings(FUZZ_SETTINGS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=8)
# Below these a run proved little. Hypothesis stops early on an operation whose
# inputs it exhausts (GET /health has none), so only operations with a path id or a
# body must reach half their examples; every other one must be called at all.
MIN_CALLS_WITH_INPUT = EXAMPLES_PER_OPERATION // 2
MIN_CALLS = 1000
MIN_SCENARIOS = 100


@dataclass
class Target:
    schema: BaseSchema
    base_url: str


@pytest.fixture
def target(postgres_url: str, tmp_path: Path) -> Iterator[Target]:
    """The service as a platform runs it, with a key, on an empty database."""
    env = {"DATABASE_URL": postgres_url, "API_KEYS": API_KEY, "LOG_LEVEL": "warning"}
    with running_service(env, tmp_path=tmp_path) as service:
        config = schemathesis.Config.from_dict({"headers": AUTH})
        schema = schemathesis.openapi.from_url(f"{service.base_url}/openapi.json", config=config)
        yield Target(schema, service.base_url)


def _seed(base_url: str) -> dict[str, str]:
    """One user, conversation and message, so generated calls also reach stored rows."""
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=10) as client:

        def create(path: str, body: dict[str, str]) -> str:
            response = client.post(path, json=body)
            assert response.status_code == 201, response.text
            return str(response.json()["uid"])

        user = create("/users", user_body())
        conversation = create(f"/users/{user}/conversations", {"title": "t"})
        message = create(f"/conversations/{conversation}/messages", {"prompt": "p"})
    return {"users": user, "conversations": conversation, "messages": message}


def _describe(case: Case, response: Response, group: FailureGroup) -> str:
    """What a failure report needs: the checks that failed, the request, the response."""
    checks = "; ".join(f"{failure.title}: {failure.message}" for failure in group.exceptions)
    content_type = ", ".join(response.headers.get("content-type", []))
    return (
        f"{case.operation.label} failed {checks}\n"
        f"  request:  {case.as_curl_command()}\n"
        f"  response: {response.status_code} {content_type} {response.text[:500]}"
    )


def _operations(schema: BaseSchema) -> list[APIOperation]:
    """Every documented operation; deletions last, users' last of all (they cascade)."""
    operations = [result.ok() for result in schema.get_all_operations()]
    return sorted(operations, key=lambda op: (op.method == "delete", op.path.startswith("/users")))


def _cases(operation: APIOperation, seeded: dict[str, str]) -> st.SearchStrategy[Case]:
    """Valid and invalid cases, with random ids and, where the path has one, a stored one."""
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    strategies = [operation.as_strategy(mode) for mode in modes]
    if "{uid}" in operation.path:
        uid = seeded[operation.path.split("/")[1]]
        strategies += [operation.as_strategy(mode, path_parameters={"uid": uid}) for mode in modes]
    return st.one_of(strategies)


def test_every_operation_answers_as_documented(target: Target) -> None:
    """Single calls to each operation: no 5xx, and every answer as documented."""
    seeded = _seed(target.base_url)
    # The last failure recorded per operation is Hypothesis' shrunk, final example.
    failures: dict[str, str] = {}
    calls: Counter[str] = Counter()
    started = time.monotonic()
    operations = _operations(target.schema)
    for operation in operations:

        @FUZZ_SETTINGS
        @given(case=_cases(operation, seeded))
        def call(case: Case) -> None:
            calls[case.operation.label] += 1
            response = case.call(timeout=10)
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as group:
                failures[case.operation.label] = _describe(case, response, group)
                raise

        with contextlib.suppress(FailureGroup):  # recorded above; on to the next operation
            call()
    print(f"fuzzed {calls.total()} calls in {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures.values())
    assert {operation.label for operation in operations} == set(calls)
    with_input = [op.label for op in operations if "{uid}" in op.path or op.body]
    assert len(with_input) >= len(operations) // 2
    assert all(calls[label] >= MIN_CALLS_WITH_INPUT for label in with_input), calls
    assert calls.total() >= MIN_CALLS, calls


def test_linked_scenarios_answer_as_documented(target: Target) -> None:
    """Create -> read -> update -> delete chains along the links schemathesis infers.

    The server's state changes between runs, so Hypothesis may find a replay "flaky"
    and stop early; like schemathesis' own runner, start again until enough scenarios
    ran, and judge the responses, which are all recorded here.
    """
    failures: list[str] = []
    scenarios = 0

    class Workflow(target.schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            nonlocal scenarios
            scenarios += 1

        def validate_response(  # type: ignore[override]
            self, response: Response, case: Case, additional_checks: object = None, **kwargs: Any
        ) -> None:
            try:
                case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)
            except FailureGroup as group:
                failures.append(_describe(case, response, group))
                raise

    started = time.monotonic()
    restarts = 0
    while scenarios < STATEFUL_SCENARIOS and time.monotonic() - started < STATEFUL_SECONDS:
        try:
            Workflow.run(settings=STATEFUL_SETTINGS)
        except Flaky:
            restarts += 1
        except FailureGroup:
            break
    print(f"ran {scenarios} scenarios ({restarts} restarts) in {time.monotonic() - started:.1f} s")
    assert not failures, "\n\n".join(failures)
    assert scenarios >= MIN_SCENARIOS, f"only {scenarios} scenarios ran"
