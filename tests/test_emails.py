"""The email type's fast path gives email-validator's (via pydantic's) answer exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

from service.emails import plain_email, valid_email
from service.models import UserUpdate

ATEXT = "abcXYZ019_!#$%&'*+-/=?^`{|}~"
# Characters email-validator treats specially, or that end its fast cases.
TRICKY = '.@<>" \t\r\n\\()[],:;-\u00c9\u00e9\u00df\ufb01\uff21\u0301\u200b\uff20\u3002'


def _pydantic(value: str) -> str | None:
    """What pydantic's EmailStr makes of `value`: the normalised address, or None."""
    try:
        return validate_email(value)[1]
    except PydanticCustomError:
        return None


def _agrees(value: str) -> None:
    plain = plain_email(value)
    if plain is not None:
        assert plain == _pydantic(value), value


label = st.text("abcXYZ09-", min_size=1, max_size=64)
address = st.builds(
    lambda local, labels, top: f"{local}@{'.'.join([*labels, top])}",
    st.text(ATEXT + ".", min_size=1, max_size=70),
    st.lists(label, min_size=0, max_size=4),
    st.sampled_from(["com", "COM", "org", "c1", "test", "invalid", "Local", "onion", "x", "a-b"]),
)


@settings(max_examples=3000, deadline=None, database=None)
@given(address)
def test_plain_shaped_addresses_agree_with_email_validator(value: str) -> None:
    _agrees(value)


@settings(max_examples=3000, deadline=None, database=None)
@given(st.text(ATEXT + TRICKY + "abc", max_size=40))
def test_any_string_agrees_with_email_validator(value: str) -> None:
    _agrees(value)


@pytest.mark.parametrize(
    "value",
    [
        "Ada@Example.COM",
        "a.b+c@mail.example.co.uk",
        "x@" + "a" * 63 + ".com",
        "x@" + "a" * 64 + ".com",
        "x@b." + "a" * 62 + "z",
        "a" * 240 + "@example.com",
        "a" * 241 + "@example.com",
        "a" * 242 + "@example.com",
        "postmaster@example.com",
        "Info@example.com",
        "a@foo.invalid",
        "a@foo.LOCAL",
        "a@x.test",
        "a@arpa",
        "a@in-addr.arpa",
        "a@ab--cd.com",
        "a@xn--bcher-kva.ch",
        "a@b.c1",
        "a@1.2.3.4",
        "a@-b.com",
        "a@b-.com",
        "a..b@example.com",
        ".a@example.com",
        "a.@example.com",
        "a@example..com",
        "a@example.com.",
        "Ada <ada@example.com>",
        " ada@example.com",
        "ada@example.com\n",
        "ÉMILE@example.org",
        "ada@faß.de",
    ],
)
def test_edge_cases_agree_with_email_validator(value: str) -> None:
    _agrees(value)
    expected = _pydantic(value)
    if expected is None:
        with pytest.raises(PydanticCustomError):
            valid_email(value)
    else:
        assert valid_email(value) == expected


def test_plain_addresses_take_the_fast_path() -> None:
    assert plain_email("Ada.Lovelace+x@Example.COM") == "Ada.Lovelace+x@example.com"
    assert plain_email("0123456789abcdef@example.com") == "0123456789abcdef@example.com"


def test_an_invalid_address_is_pydantics_error() -> None:
    with pytest.raises(ValidationError) as raised:
        UserUpdate.model_validate({"email": "ada@localhost"})
    (error,) = raised.value.errors()
    assert error["type"] == "value_error"
    assert error["msg"] == (
        "value is not a valid email address: "
        "The part after the @-sign is not valid. It should have a period."
    )
