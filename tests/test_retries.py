"""No deadlock or serialization failure becomes a 500: messages and user deletes
take their locks in one order, and an aborted transaction is run again (then
409 with Retry-After), against the real process and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.factories import user_body
from tests.support import execute, running_service

pytestmark = pytest.mark.postgres

ROUNDS, CREATES = 8, 16
# Fails the first `n` inserts into users with the given SQLSTATE. A sequence
# counts them because nextval() survives the rollback of the failed transaction.
FLAKY_INSERTS = """
    CREATE SEQUENCE insert_attempts;
    CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF nextval('insert_attempts') <= {n} THEN
            RAISE EXCEPTION 'simulated' USING ERRCODE = '{sqlstate}';
        END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER flaky BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION flaky();
"""


async def race_round(client: httpx.AsyncClient) -> list[int]:
    """A user with a conversation; 16 messages added while the user is deleted."""
    user = (await client.post("/users", json=user_body())).json()
    conversation = (
        await client.post(f"/users/{user['uid']}/conversations", json={"title": "t"})
    ).json()
    creates = [
        client.post(f"/conversations/{conversation['uid']}/messages", json={"prompt": f"{n}"})
        for n in range(CREATES)
    ]
    responses = await asyncio.gather(
        *creates[: CREATES // 2], client.delete(f"/users/{user['uid']}"), *creates[CREATES // 2 :]
    )
    return [response.status_code for response in responses]


def test_messages_racing_a_delete_of_their_user_never_get_a_500(
    postgres_url: str, tmp_path: Path
) -> None:
    async def scenario(base_url: str) -> Counter[int]:
        limits = httpx.Limits(max_connections=CREATES + 1)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
            statuses: Counter[int] = Counter()
            for _ in range(ROUNDS):
                statuses.update(await race_round(client))
            return statuses

    env = {"DATABASE_URL": postgres_url, "DB_POOL_SIZE": "10", "DB_MAX_OVERFLOW": "10"}
    with running_service(env, tmp_path=tmp_path) as service:
        statuses = asyncio.run(scenario(service.base_url))
    log = service.log()

    assert set(statuses) <= {201, 204, 404}, (statuses, log[-3000:])
    assert statuses[204] == ROUNDS  # every delete went through
    assert "deadlock detected" not in log
    assert "Traceback" not in log


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_an_aborted_transaction_is_run_again(
    postgres_url: str, tmp_path: Path, sqlstate: str
) -> None:
    with running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service:
        asyncio.run(execute(postgres_url, FLAKY_INSERTS.format(n=2, sqlstate=sqlstate)))
        created = httpx.post(f"{service.base_url}/users", json=user_body(username="third"))
        listed = httpx.get(f"{service.base_url}/users").json()["items"]

    assert created.status_code == 201, created.text
    assert [user["username"] for user in listed] == ["third"]  # stored once
    assert f"(SQLSTATE {sqlstate}); running it again (attempt 3 of 3)" in service.log()


def test_a_conflict_that_persists_is_409_with_retry_after(
    postgres_url: str, tmp_path: Path
) -> None:
    with running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service:
        asyncio.run(execute(postgres_url, FLAKY_INSERTS.format(n=3, sqlstate="40P01")))
        refused = httpx.post(f"{service.base_url}/users", json=user_body())
        then = httpx.post(f"{service.base_url}/users", json=user_body())
    log = service.log()

    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert "deadlock" in refused.json()["detail"]
    assert "database conflict: DBAPIError (SQLSTATE 40P01)" in log
    assert "Traceback" not in log
    assert then.status_code == 201


def test_a_patch_does_not_hold_up_new_children_of_its_row(
    postgres_url: str, tmp_path: Path
) -> None:
    """PATCH locks FOR NO KEY UPDATE: a conversation can be added to a user while
    the user's update is still running (here held 2 s by a trigger)."""
    slow_updates = """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$;
        CREATE TRIGGER slow BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION slow();
    """

    async def scenario(base_url: str) -> tuple[int, int, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            uid = (await client.post("/users", json=user_body())).json()["uid"]
            await execute(postgres_url, slow_updates)
            patch = asyncio.create_task(client.patch(f"/users/{uid}", json={"username": "b"}))
            await asyncio.sleep(0.5)  # the PATCH now holds its lock, inside the trigger
            started = asyncio.get_running_loop().time()
            created = await client.post(f"/users/{uid}/conversations", json={"title": "t"})
            took = asyncio.get_running_loop().time() - started
            return (await patch).status_code, created.status_code, took

    with running_service({"DATABASE_URL": postgres_url}, tmp_path=tmp_path) as service:
        patched, created, took = asyncio.run(scenario(service.base_url))

    assert (patched, created) == (200, 201)
    assert took < 1.0  # ~1.5 s when PATCH took FOR UPDATE
