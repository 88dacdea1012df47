"""Idempotency-Key on POST: a retry replays the first response, never a duplicate."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from starlette.testclient import TestClient

from service.app import create_app
from service.idempotency import PRUNE_BATCH
from tests.conftest import make_settings
from tests.factories import create_conversation, create_user, user_body
from tests.pgbouncer import running_pgbouncer
from tests.support import (
    execute,
    fetch_value,
    locked_table,
    metric,
    parse_metrics,
    running_service,
    wait_for_lock_waiters,
)

# Well before any key's created_at: moving keys there expires them on every backend.
LONG_AGO = "2000-01-01 00:00:00.000000"
CONCURRENT_DUPLICATES = 20


def sql_value(database_url: str, sql: str) -> Any:
    """One value straight from the database, bypassing the service."""
    if database_url.startswith("sqlite"):
        with closing(sqlite3.connect(make_url(database_url).database or "")) as connection:
            return connection.execute(sql).fetchone()[0]
    return asyncio.run(fetch_value(database_url, sql))


def sql_execute(database_url: str, sql: str) -> None:
    """Run one statement straight on the database, bypassing the service."""
    if database_url.startswith("sqlite"):
        with closing(sqlite3.connect(make_url(database_url).database or "")) as connection:
            connection.execute(sql)
            connection.commit()
        return
    asyncio.run(execute(database_url, sql))


def stored_keys(database_url: str) -> int:
    return int(sql_value(database_url, "SELECT count(*) FROM idempotency_keys"))


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


@pytest.fixture
def conversation(client: TestClient) -> dict[str, str]:
    return create_conversation(client, create_user(client)["uid"])


def _creates(conversation: dict[str, str]) -> dict[str, tuple[str, Any, str]]:
    """Every POST route: its path, a body, and the list that shows what it created."""
    user = conversation["user_uid"]
    return {
        "user": ("/users", user_body(), "/users"),
        "conversation": (
            f"/users/{user}/conversations",
            {"title": "t"},
            f"/users/{user}/conversations",
        ),
        "message": (
            f"/conversations/{conversation['uid']}/messages",
            {"prompt": "p"},
            f"/conversations/{conversation['uid']}/messages",
        ),
    }


def count(client: TestClient, listing: str) -> int:
    return len(client.get(listing, params={"limit": 200}).json()["items"])


@pytest.mark.parametrize("route", ["user", "conversation", "message"])
def test_a_retry_replays_the_first_response_byte_for_byte(
    client: TestClient, conversation: dict[str, str], route: str
) -> None:
    path, body, listing = _creates(conversation)[route]
    before = count(client, listing)

    first = client.post(path, json=body, headers=keyed("retry-1"))
    conversation_etag = client.get(f"/conversations/{conversation['uid']}").headers["etag"]
    retries = [client.post(path, json=body, headers=keyed("retry-1")) for _ in range(3)]

    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    for retry in retries:
        assert retry.status_code == 201
        assert retry.content == first.content
        assert retry.headers["location"] == first.headers["location"]
        assert retry.headers["etag"] == first.headers["etag"]
        assert retry.headers["content-type"] == first.headers["content-type"]
        assert retry.headers["idempotent-replayed"] == "true"
    assert count(client, listing) == before + 1
    # A replay writes nothing: not even the conversation's updated_at moves.
    assert client.get(f"/conversations/{conversation['uid']}").headers["etag"] == conversation_etag


def test_replays_are_counted_in_the_metrics(client: TestClient) -> None:
    body = user_body()
    before = parse_metrics(client.get("/metrics").text)

    client.post("/users", json=body, headers=keyed("k"))
    client.post("/users", json=body, headers=keyed("k"))
    client.post("/users", json=body, headers=keyed("k"))
    after = parse_metrics(client.get("/metrics").text)

    counted = metric(after, "idempotent_replays_total") - metric(before, "idempotent_replays_total")
    assert counted == 2  # the retries, not the first request


def test_a_retried_user_create_is_not_a_409_for_its_own_email(client: TestClient) -> None:
    body = user_body()

    first = client.post("/users", json=body, headers=keyed("sign-up"))
    retry = client.post("/users", json=body, headers=keyed("sign-up"))
    unkeyed = client.post("/users", json=body)

    assert (first.status_code, retry.status_code, unkeyed.status_code) == (201, 201, 409)
    assert retry.json() == first.json()


def test_the_same_key_for_another_request_is_422(
    client: TestClient, conversation: dict[str, str]
) -> None:
    messages = f"/conversations/{conversation['uid']}/messages"
    assert client.post(messages, json={"prompt": "p"}, headers=keyed("k")).status_code == 201

    other_body = client.post(messages, json={"prompt": "q"}, headers=keyed("k"))
    same_json_other_bytes = client.post(
        messages,
        content=b'{"prompt":  "p"}',
        headers=keyed("k", **{"content-type": "application/json"}),
    )
    other_path = client.post(
        f"/users/{conversation['user_uid']}/conversations", json={"prompt": "p"}, headers=keyed("k")
    )

    for response in (other_body, same_json_other_bytes, other_path):
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert count(client, messages) == 1
    assert count(client, f"/users/{conversation['user_uid']}/conversations") == 1


@pytest.mark.parametrize(
    "key",
    [b"", b"x" * 256, b"tab\tinside", b"del\x7f", "caf\u00e9".encode("latin-1"), "ü".encode()],
    ids=["empty", "256 chars", "tab", "DEL", "latin-1", "utf-8"],
)
def test_a_bad_key_is_400_and_creates_nothing(client: TestClient, key: bytes) -> None:
    response = client.post("/users", json=user_body(), headers={"Idempotency-Key": key})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert "Idempotency-Key" in response.json()["detail"]
    assert count(client, "/users") == 0


def test_two_keys_at_once_are_400(client: TestClient) -> None:
    response = client.post(
        "/users",
        json=user_body(),
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )

    assert response.status_code == 400


def test_any_printable_ascii_key_up_to_255_characters_works(client: TestClient) -> None:
    printable = "".join(map(chr, range(0x21, 0x7F)))
    for key in (printable, "k" * 255, "with inner spaces", '"quoted sf-string"'):
        body = user_body()
        first = client.post("/users", json=body, headers=keyed(key))
        retry = client.post("/users", json=body, headers=keyed(key))
        assert (first.status_code, retry.status_code) == (201, 201), (key, first.text)
        assert retry.headers["idempotent-replayed"] == "true"
    assert count(client, "/users") == 4


def test_a_failed_request_is_not_stored_so_its_retry_runs(
    client: TestClient, conversation: dict[str, str], database_url: str
) -> None:
    messages = f"/conversations/{conversation['uid']}/messages"

    invalid = client.post(messages, json={"prompt": None}, headers=keyed("fix-me"))
    fixed = client.post(messages, json={"prompt": "p"}, headers=keyed("fix-me"))
    taken = client.post("/users", json=user_body(email="x@example.com"), headers=keyed("e"))
    repeat = client.post("/users", json=user_body(email="x@example.com"), headers=keyed("e2"))

    assert (invalid.status_code, fixed.status_code) == (422, 201)
    assert "idempotent-replayed" not in fixed.headers
    assert (taken.status_code, repeat.status_code) == (201, 409)
    assert stored_keys(database_url) == 2  # fix-me and e: the failures left no row


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every statement any engine of this process sends, while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_without_a_key_nothing_changes_and_a_key_adds_its_own_statements(
    client: TestClient, conversation: dict[str, str], database_url: str
) -> None:
    messages = f"/conversations/{conversation['uid']}/messages"
    client.post(messages, json={"prompt": "warm-up"}, headers=keyed("warm-up"))

    with statements() as unkeyed:
        assert client.post(messages, json={"prompt": "p"}).status_code == 201
    with statements() as with_key:
        assert client.post(messages, json={"prompt": "p"}, headers=keyed("k")).status_code == 201
    with statements() as replayed:
        assert client.post(messages, json={"prompt": "p"}, headers=keyed("k")).status_code == 201

    assert not any("idempotency_keys" in statement for statement in unkeyed)
    own = [statement for statement in with_key if "idempotency_keys" in statement]
    assert [statement for statement in with_key if statement not in own] == unkeyed
    replay_own = [statement for statement in replayed if "idempotency_keys" in statement]
    assert replay_own == replayed  # a replay runs none of the handler's statements
    if database_url.startswith("postgresql"):
        assert len(own) == 2  # the claim (with its pruning) and storing the response
        assert len(replayed) == 1


def test_keys_are_scoped_to_the_caller(database_url: str) -> None:
    settings = make_settings(database_url, api_keys=("first-key", "second-key"))
    body = user_body()
    with TestClient(create_app(settings)) as client:

        def post(bearer: str) -> httpx.Response:
            headers = keyed("shared-key", Authorization=f"Bearer {bearer}")
            return client.post(
                "/users", json={**body, "email": f"{bearer}@example.com"}, headers=headers
            )

        first, second = post("first-key"), post("second-key")
        first_again, second_again = post("first-key"), post("second-key")
        listed = client.get("/users", headers={"Authorization": "Bearer first-key"}).json()

    assert (first.status_code, second.status_code) == (201, 201)
    assert "idempotent-replayed" not in second.headers  # the other caller's key is not seen
    assert first.json()["uid"] != second.json()["uid"]
    assert first_again.content == first.content
    assert second_again.content == second.content
    assert len(listed["items"]) == 2
    scopes = sql_value(database_url, "SELECT count(DISTINCT scope) FROM idempotency_keys")
    leaked = sql_value(
        database_url, "SELECT count(*) FROM idempotency_keys WHERE scope LIKE '%-key%'"
    )
    assert (scopes, leaked) == (2, 0)  # stored as hashes, never the bearer keys


def test_an_expired_key_is_free_again(
    client: TestClient, conversation: dict[str, str], database_url: str
) -> None:
    messages = f"/conversations/{conversation['uid']}/messages"
    first = client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
    sql_execute(database_url, f"UPDATE idempotency_keys SET created_at = '{LONG_AGO}'")

    again = client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
    other = client.post(messages, json={"prompt": "other"}, headers=keyed("k"))

    assert (first.status_code, again.status_code, other.status_code) == (201, 201, 422)
    assert "idempotent-replayed" not in again.headers
    assert again.json()["uid"] != first.json()["uid"]
    assert count(client, messages) == 2


def test_the_ttl_comes_from_the_settings(database_url: str) -> None:
    settings = make_settings(database_url, idempotency_ttl_seconds=1)
    body = user_body()
    with TestClient(create_app(settings)) as client:
        first = client.post("/users", json=body, headers=keyed("k"))
        replayed = client.post("/users", json=body, headers=keyed("k"))
        client.delete(first.headers["location"])  # its email is free again
        time.sleep(1.5)
        expired = client.post("/users", json=body, headers=keyed("k"))

    assert replayed.headers["idempotent-replayed"] == "true"
    assert expired.status_code == 201
    assert "idempotent-replayed" not in expired.headers


def test_each_claim_prunes_a_bounded_batch_of_expired_keys(
    client: TestClient, database_url: str
) -> None:
    for number in range(PRUNE_BATCH + 2):
        client.post("/users", json=user_body(), headers=keyed(f"old-{number}"))
    sql_execute(database_url, f"UPDATE idempotency_keys SET created_at = '{LONG_AGO}'")

    client.post("/users", json=user_body(), headers=keyed("new-1"))
    after_one = stored_keys(database_url)
    client.post("/users", json=user_body(), headers=keyed("new-2"))
    after_two = stored_keys(database_url)

    assert after_one == 2 + 1  # PRUNE_BATCH of the old ones went, the new one came
    assert after_two == 2  # the rest went; two live keys are left


def _failing_commit_trigger(database_url: str) -> tuple[str, str]:
    """DDL that makes the keyed message create fail after both rows were written,
    and the DDL that removes it again."""
    if database_url.startswith("sqlite"):
        # SQLite has no deferred triggers: fail the last write before the commit.
        return (
            "CREATE TRIGGER fail_late BEFORE UPDATE ON idempotency_keys"
            " BEGIN SELECT RAISE(ABORT, 'simulated failure'); END",
            "DROP TRIGGER fail_late",
        )
    # Deferred: it fires at COMMIT itself, after the message and the key were flushed.
    return (
        "CREATE FUNCTION fail_late() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'simulated commit failure'; END $$;"
        " CREATE CONSTRAINT TRIGGER fail_late AFTER INSERT ON messages"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_late()",
        "DROP TRIGGER fail_late ON messages",
    )


def test_the_key_and_the_resource_commit_together(
    client: TestClient, conversation: dict[str, str], database_url: str
) -> None:
    messages = f"/conversations/{conversation['uid']}/messages"
    create_trigger, drop_trigger = _failing_commit_trigger(database_url)
    sql_execute(database_url, create_trigger)

    failed = client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
    left_behind = (count(client, messages), stored_keys(database_url))
    sql_execute(database_url, drop_trigger)
    retried = client.post(messages, json={"prompt": "p"}, headers=keyed("k"))

    assert failed.status_code == 500
    assert left_behind == (0, 0)
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert count(client, messages) == 1


# Fails the first insert into users with a deadlock (40P01); a sequence counts the
# attempts because nextval() survives the rollback of the aborted transaction.
DEADLOCK_ONCE = """
    CREATE SEQUENCE insert_attempts;
    CREATE FUNCTION deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF nextval('insert_attempts') = 1 THEN
            RAISE EXCEPTION 'simulated' USING ERRCODE = '40P01';
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER deadlock_once BEFORE INSERT ON users
        FOR EACH ROW EXECUTE FUNCTION deadlock_once();
"""


@pytest.mark.postgres
def test_a_request_run_again_after_a_deadlock_claims_its_key_again(postgres_url: str) -> None:
    """The aborted transaction took the claim with it; the second run must claim
    again, or its response would never be stored for the retry to replay."""
    body = user_body()
    with TestClient(create_app(make_settings(postgres_url))) as client:
        asyncio.run(execute(postgres_url, DEADLOCK_ONCE))
        created = client.post("/users", json=body, headers=keyed("k"))
        replayed = client.post("/users", json=body, headers=keyed("k"))

    assert created.status_code == 201, created.text
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.content == created.content
    assert stored_keys(postgres_url) == 1


# -- concurrency, against the real service -------------------------------------------


async def _duplicates(base_url: str, path: str, key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(path, json={"prompt": "once"}, headers=keyed(key))
                    for _ in range(CONCURRENT_DUPLICATES)
                )
            )
        )


def _assert_one_resource_per_key(env: dict[str, str], tmp_path: Path) -> None:
    """Rounds of concurrent duplicates against the real service (2 workers): each
    round makes one message, and every answer is that message's 201 or a 409."""
    env = {**env, "WEB_CONCURRENCY": "2", "LOG_LEVEL": "warning"}
    with (
        running_service(env, tmp_path=tmp_path) as service,
        httpx.Client(base_url=service.base_url, timeout=10) as client,
    ):
        user = client.post("/users", json=user_body()).json()["uid"]
        conversation = client.post(f"/users/{user}/conversations", json={"title": "t"}).json()
        messages = f"/conversations/{conversation['uid']}/messages"
        rounds = [
            asyncio.run(_duplicates(service.base_url, messages, f"round-{number}"))
            for number in range(3)
        ]
        stored = client.get(messages, params={"limit": 200}).json()["items"]

    for responses in rounds:
        unexpected = [r.text for r in responses if r.status_code not in (201, 409)]
        assert not unexpected
        created = [response for response in responses if response.status_code == 201]
        assert created
        assert len({response.content for response in created}) == 1
        for response in responses:
            if response.status_code == 409:
                assert response.headers["retry-after"] == "1"
    assert len(stored) == len(rounds)
    assert "Traceback" not in service.log()


@pytest.mark.process
def test_concurrent_duplicates_make_exactly_one_resource(database_url: str, tmp_path: Path) -> None:
    _assert_one_resource_per_key({"DATABASE_URL": database_url}, tmp_path)


@pytest.mark.postgres
@pytest.mark.process
def test_concurrent_duplicates_behind_pgbouncer(postgres_url: str, tmp_path: Path) -> None:
    """Transaction mode: the advisory lock lives and dies with the transaction."""
    with running_pgbouncer(postgres_url, pool_size=3) as bouncer:
        env = {"DATABASE_URL": bouncer.url_for(postgres_url), "DB_PGBOUNCER": "true"}
        _assert_one_resource_per_key(env, tmp_path)


@pytest.mark.postgres
@pytest.mark.process
def test_a_duplicate_of_a_running_request_is_409(postgres_url: str, tmp_path: Path) -> None:
    async def scenario(base_url: str, messages: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with locked_table(postgres_url, "conversations"):
                # The first request claims its key, then waits on the table lock.
                first = asyncio.create_task(
                    client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
                )
                await wait_for_lock_waiters(postgres_url, 1)
                duplicate = await client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
            created = await first
            retry = await client.post(messages, json={"prompt": "p"}, headers=keyed("k"))
        return [duplicate, created, retry]

    with (
        running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service,
        httpx.Client(base_url=service.base_url, timeout=10) as client,
    ):
        user = client.post("/users", json=user_body()).json()["uid"]
        conversation = client.post(f"/users/{user}/conversations", json={"title": "t"}).json()
        messages = f"/conversations/{conversation['uid']}/messages"
        duplicate, created, retry = asyncio.run(scenario(service.base_url, messages))
        stored = client.get(messages).json()["items"]

    assert duplicate.status_code == 409
    assert duplicate.headers["retry-after"] == "1"
    assert duplicate.headers["content-type"] == "application/problem+json"
    assert created.status_code == 201
    assert retry.status_code == 201
    assert retry.content == created.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert len(stored) == 1
