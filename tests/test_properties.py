"""Hypothesis properties on both backends.

Keyset pagination: walking the pages of a list with any page sizes, while other
clients insert rows through the API, returns every row that existed before the
walk once, in the documented order. Validation: a user body is stored (201)
exactly when the contract says it is valid, and is otherwise a 422 that stores
nothing; whatever arrives in a body or a query, the answer is never a 5xx.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from service.app import create_app
from tests.conftest import make_settings
from tests.factories import user_body
from tests.support import encode_cursor, running_service

BOUNDED = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = {"Content-Type": "application/json"}

# -- keyset pagination under concurrent inserts ---------------------------------


@dataclass(frozen=True)
class Listing:
    """A paginated list, and how to add one row to it through the API."""

    path: str
    add: Callable[[httpx.Client], str]


def _add_user(client: httpx.Client) -> str:
    response = client.post("/users", json=user_body())
    assert response.status_code == 201, response.text
    return str(response.json()["uid"])


def _listing(client: httpx.Client, kind: str) -> Listing:
    if kind == "users":
        return Listing("/users", _add_user)
    user = _add_user(client)
    created = client.post(f"/users/{user}/conversations", json={"title": "t"})
    assert created.status_code == 201, created.text
    conversation = created.json()["uid"]

    def add_message(client: httpx.Client) -> str:
        response = client.post(f"/conversations/{conversation}/messages", json={"prompt": "p"})
        assert response.status_code == 201, response.text
        return str(response.json()["uid"])

    return Listing(f"/conversations/{conversation}/messages", add_message)


def _walk(
    client: httpx.Client, path: str, limits: list[int], *, max_pages: int
) -> list[dict[str, Any]]:
    """Every page from the first to the one whose next_cursor is null."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for page_number in range(max_pages):
        limit = limits[page_number % len(limits)]
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the walk never reached a last page")


def _sort_key(item: dict[str, Any]) -> tuple[datetime, uuid.UUID]:
    """The documented order: oldest first, ties broken by uid."""
    return datetime.fromisoformat(item["created_at"]), uuid.UUID(item["uid"])


@pytest.fixture
def base_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    env = {"DATABASE_URL": database_url, "LOG_LEVEL": "warning"}
    with running_service(env, tmp_path=tmp_path) as service:
        yield service.base_url


@pytest.mark.process
@pytest.mark.parametrize("kind", ["users", "messages"])
def test_walking_pages_while_rows_are_added_sees_every_row_once(base_url: str, kind: str) -> None:
    """Keyset cursors: no duplicates, no misses of rows that existed before the walk,
    and the documented order, however pages are sized and whatever is inserted meanwhile."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        listing = _listing(client, kind)
        existing: list[str] = []

        # No shrinking: every replay adds rows, so a smaller example is not simpler.
        @settings(BOUNDED, max_examples=40, phases=[Phase.explicit, Phase.generate])
        @given(
            before=st.integers(0, 8),
            during=st.integers(0, 8),
            limits=st.lists(st.integers(1, 25), min_size=1, max_size=4),
        )
        def walk_while_inserting(before: int, during: int, limits: list[int]) -> None:
            existing.extend(listing.add(client) for _ in range(before))
            inserted: list[str] = []

            def insert() -> None:
                with httpx.Client(base_url=base_url, timeout=10) as other:
                    inserted.extend(listing.add(other) for _ in range(during))

            inserter = threading.Thread(target=insert)
            inserter.start()
            try:
                most = len(existing) + during + 2  # even one row a page ends by then
                walked = _walk(client, listing.path, limits, max_pages=most)
            finally:
                inserter.join()
            uids = [item["uid"] for item in walked]
            assert len(uids) == len(set(uids)), "a row came twice"
            assert set(existing) <= set(uids), "a row that existed before the walk was missed"
            assert set(uids) <= set(existing) | set(inserted), "a row nobody inserted"
            keys = [_sort_key(item) for item in walked]
            assert keys == sorted(keys), "not in the documented order"
            existing.extend(inserted)

        walk_while_inserting()


# -- validation of user bodies --------------------------------------------------

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "\ud83d"])
NOT_TEXT = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _text(low: int, high: int) -> st.SearchStrategy[str]:
    """Storable strings within the bounds, the upper bound itself included."""
    storable = st.characters(exclude_characters="\x00")  # and surrogates, by default
    return st.text(storable, min_size=low, max_size=min(high, 20)) | st.text(
        storable, min_size=high, max_size=high
    )


def _text_around(high: int) -> st.SearchStrategy[Any]:
    """Wrong in exactly one way: a NUL or a lone surrogate inside, empty, just too
    long, or not a string at all."""
    short = st.text(max_size=5)
    return st.one_of(
        st.builds(lambda head, tail: f"{head}\x00{tail}", short, short),
        st.builds(lambda head, bad, tail: head + bad + tail, short, LONE_SURROGATES, short),
        st.text(st.characters(codec="ascii"), min_size=high + 1, max_size=high + 2),
        st.just(""),
        NOT_TEXT,
    )


ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
EMAIL = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    st.text(ALNUM, min_size=1, max_size=20),
    st.lists(st.text(ALNUM, min_size=1, max_size=20), min_size=1, max_size=3),
    st.sampled_from(["com", "org", "net", "io"]),
)
LONG_EMAIL = st.builds(  # around 254 characters
    lambda local, labels: f"{local}@{'.'.join(labels)}.com",
    st.text(ALNUM, min_size=60, max_size=70),
    st.lists(st.text(ALNUM, min_size=40, max_size=63), min_size=1, max_size=5),
)
BROKEN_EMAIL = st.one_of(
    st.text(ALNUM + ".", max_size=20),  # no @ at all
    st.sampled_from(["@example.com", "ada@", "ada@@example.com", "a da@example.com"]),
    st.sampled_from(["ada@exa\x00mple.com", "a\x00da@example.com", "ada@example..com"]),
    NOT_TEXT,
)
# Per field: values the contract accepts, and values around and beyond them.
FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "username": (_text(1, 64), _text_around(64)),
    "email": (EMAIL, LONG_EMAIL | BROKEN_EMAIL),
    "first_name": (_text(1, 100), _text_around(100)),
    "last_name": (_text(1, 100), _text_around(100)),
    "role": (st.sampled_from(["user", "admin"]), st.sampled_from(["User", "root", ""]) | NOT_TEXT),
    "is_verified": (st.booleans(), st.sampled_from([0, 1, "true", "false", None])),
}
REQUIRED = ("username", "email", "first_name", "last_name")
STRANGERS = {"nickname": "x", "uid": str(uuid.UUID(int=1)), "created_at": "2026-01-01T00:00:00Z"}


@st.composite
def user_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with up to two defects: a required field missing, an unknown or
    server-set field, or a value out of bounds or of the wrong type."""
    present = [name for name in FIELDS if name in REQUIRED or draw(st.booleans())]
    body = {name: draw(FIELDS[name][0]) for name in present}
    for _ in range(draw(st.integers(0, 2))):
        defect = draw(st.sampled_from(["missing", "stranger", *FIELDS]))
        if defect == "missing":
            body.pop(draw(st.sampled_from(REQUIRED)), None)
        elif defect == "stranger":
            stranger = draw(st.sampled_from(sorted(STRANGERS)))
            body[stranger] = STRANGERS[stranger]
        else:
            body[defect] = draw(FIELDS[defect][1])
    return body


def _storable(text: str) -> bool:
    return "\x00" not in text and not any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _is_text(value: Any, low: int, high: int) -> bool:
    return isinstance(value, str) and low <= len(value) <= high and _storable(value)


def _is_email(value: Any) -> bool:
    """Only the generated shapes count: `local@labels.tld` in ASCII letters and digits,
    at most 254 characters. (Like email-validator by default, and so the service, this
    allows a local part longer than RFC 5321's 64.)"""
    if not isinstance(value, str) or len(value) > 254 or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    labels = domain.split(".")
    return (
        local.isascii()
        and local.isalnum()
        and len(labels) >= 2
        and all(label.isascii() and label.isalnum() and len(label) <= 63 for label in labels)
    )


def _is_valid(body: dict[str, Any]) -> bool:
    """The contract's rules for a new user, written out independently of the models."""
    checks = {
        "username": lambda v: _is_text(v, 1, 64),
        "email": _is_email,
        "first_name": lambda v: _is_text(v, 1, 100),
        "last_name": lambda v: _is_text(v, 1, 100),
        "role": lambda v: v in ("user", "admin") and isinstance(v, str),
        "is_verified": lambda v: isinstance(v, bool),
    }
    return (
        set(body) <= set(checks)
        and all(name in body for name in REQUIRED)
        and all(checks[name](value) for name, value in body.items())
    )


def _user_count(client: TestClient) -> int:
    response = client.get("/users", params={"limit": 200})
    assert response.status_code == 200 and response.json()["next_cursor"] is None
    return len(response.json()["items"])


LONGEST_EMAIL = f"{'a' * 64}@{'b' * 60}.{'c' * 60}.{'d' * 60}.com"  # 251 characters
# Each rule at its edge, alone (the random bodies mostly break several at once).
EDGES: list[dict[str, Any]] = [
    {},
    {"username": "a" * 64, "first_name": "f" * 100, "last_name": "l" * 100},
    {"username": "a" * 65},
    {"first_name": "f" * 101},
    {"last_name": ""},
    {"username": "a\x00b"},
    {"first_name": "\ud800"},
    {"last_name": "x\udfff"},
    {"email": LONGEST_EMAIL},
    {"email": LONGEST_EMAIL.replace(".com", ".info")},  # 252
    {"email": f"{'a' * 60}@{'b' * 60}.{'c' * 60}.{'d' * 60}.{'e' * 4}.com"},  # 256
    {"email": "ada.example.com"},
    {"email": None},
    {"role": "admin", "is_verified": True},
    {"role": "Admin"},
    {"is_verified": 1},
    {"uid": str(uuid.UUID(int=1))},
    {"nickname": "ada"},
]


def _each_rule_alone(test: Callable[..., None]) -> Callable[..., None]:
    """Explicit examples, sent as they are (reuse=-1): Ada with one rule at its edge."""
    for n, edge in enumerate(EDGES):
        ada = {"username": "ada", "email": f"ada{n}@example.com", "first_name": "A"}
        body = {"last_name": "L"} | ada | edge
        test = example(body={k: v for k, v in body.items() if v is not None}, reuse=-1)(test)
    return test


def _with_email(body: dict[str, Any], email: str) -> dict[str, Any]:
    return body | {"email": email} if "email" in body else body


def test_a_user_is_stored_exactly_when_its_body_is_valid(database_url: str) -> None:
    """201 for a valid body (409 if its email is taken, in any case), 422 naming the
    body for any other, never a 5xx; and a 422 stores nothing."""
    taken: list[str] = []
    with TestClient(create_app(make_settings(database_url))) as client:

        @settings(BOUNDED, max_examples=100)
        @given(body=user_bodies(), reuse=st.integers(0, 9))
        @_each_rule_alone
        def post_user(body: dict[str, Any], reuse: int) -> None:
            email = body.get("email")
            if reuse == 0 and taken:  # someone else's address, in capitals
                body = _with_email(body, taken[-1].upper())
            elif reuse > 0 and isinstance(email, str) and "@" in email:  # a fresh one
                body = _with_email(body, email.replace("@", f"@n{len(taken)}.", 1))
            raw = json.dumps(body)  # ASCII, with lone surrogates as \ud800 escapes
            as_received = json.loads(raw)  # the server's view: escaped pairs are joined
            response = client.post("/users", content=raw, headers=JSON)
            if not _is_valid(as_received):
                assert response.status_code == 422, (body, response.text)
                problem = response.json()
                assert problem["errors"] and all(e["loc"][0] == "body" for e in problem["errors"])
            elif as_received["email"].lower() in taken:
                assert response.status_code == 409, (body, response.text)
            else:
                assert response.status_code == 201, (body, response.text)
                user = response.json()
                expected = {"role": "user", "is_verified": False} | as_received
                assert {name: user[name] for name in expected} == expected
                assert (user["verified_at"] is not None) == expected["is_verified"]
                taken.append(as_received["email"].lower())
            assert _user_count(client) == len(taken), "a rejected body was stored"

        post_user()


# -- nothing a client sends is a 5xx ---------------------------------------------


OFFSETS = st.integers(-1439, 1439).map(lambda minutes: timezone(timedelta(minutes=minutes)))
EDGE_TIMES = st.sampled_from([datetime.min, datetime.max]).flatmap(
    lambda edge: OFFSETS.map(lambda offset: edge.replace(tzinfo=offset))
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
FORGED_CURSORS = st.tuples(  # the shape the service issues, with any time and any uid
    (st.datetimes(timezones=OFFSETS) | EDGE_TIMES).map(datetime.isoformat),
    st.uuids().map(lambda uid: uid.hex) | JSON_VALUES,
).map(list)
CURSORS = st.one_of(
    st.text(max_size=30),
    FORGED_CURSORS.map(encode_cursor),
    JSON_VALUES.map(encode_cursor),
    st.binary(max_size=20).map(encode_cursor),
)
LIMITS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.text(max_size=8),
    st.integers(1, 6000).map(lambda digits: "9" * digits),
)


def test_any_page_query_is_answered_without_a_server_error(database_url: str) -> None:
    """A page query is served (200) or refused (422), whatever it holds."""
    with TestClient(create_app(make_settings(database_url))) as client:

        @example(limit="1" * 5000, cursor=None)
        @example(limit=None, cursor=encode_cursor(b"[" * 5000 + b"]" * 5000))
        @example(limit=None, cursor=encode_cursor(["2026-01-01T00:00:00+00:00", 5]))
        @example(
            limit=None, cursor=encode_cursor(["0001-01-01T00:00:00+14:00", uuid.UUID(int=0).hex])
        )
        @settings(BOUNDED, max_examples=100)
        @given(limit=st.none() | LIMITS, cursor=st.none() | CURSORS)
        def list_users(limit: str | None, cursor: str | None) -> None:
            params = {"limit": limit, "cursor": cursor}
            params = {name: value for name, value in params.items() if value is not None}
            response = client.get("/users", params=params)
            assert response.status_code in (200, 422), (params, response.text)

        list_users()


def test_any_body_is_answered_without_a_server_error(database_url: str) -> None:
    """A body that is not JSON, not an object or not a user is a 400 or a 422."""
    with TestClient(create_app(make_settings(database_url))) as client:

        @example(raw=b"[" * 100_000 + b"]" * 100_000)
        @settings(BOUNDED, max_examples=100)
        @given(raw=st.binary(max_size=40) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
        def post_user(raw: bytes) -> None:
            response = client.post("/users", content=raw, headers=JSON)
            assert response.status_code in (400, 422), (raw[:80], response.text)

        post_user()
