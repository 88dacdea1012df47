"""The email address type of request bodies: pydantic's `EmailStr` verdict, cheaper.

`EmailStr` runs email-validator, pure Python that looks at every character of the
domain through Unicode tables and IDNA: about 350,000 CPU instructions an address,
more than the rest of a `POST /users` body's validation together. Nearly every
address a client sends is plain ASCII, `local@label.label`, and for those
email-validator's answer is known without running it: the address as sent with
its domain in lower case. `PLAIN_EMAIL` recognises exactly such addresses; every
other value (Unicode, quotes, a display name, Punycode, a reserved domain,
anything unusual) goes to email-validator as before, so each 422 stays the same.
tests/test_emails.py checks the two agree.
"""

from __future__ import annotations

import re
from typing import Any

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic.networks import validate_email
from pydantic_core import core_schema

# email-validator's dot-atom local part (RFC 5322 atext), and a domain of at
# least two LDH labels that ends in a letter (its globally-deliverable rule).
_ATEXT = r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_TOP_LABEL = r"(?:[a-zA-Z0-9][a-zA-Z0-9-]{0,61})?[a-zA-Z]"
PLAIN_EMAIL = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@((?:{_LABEL}\.)+{_TOP_LABEL})")
# email-validator's limit for the whole address (in bytes: characters, for ASCII),
# which also keeps the domain inside its 253; past it, it is the one to explain.
MAX_PLAIN_EMAIL = 254
_ROLE_MAILBOXES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)  # lowered by email-validator


def plain_email(value: str) -> str | None:
    """email-validator's normalised form of `value`, when `value` is a plain ASCII
    address whose verdict is known; None for anything else."""
    if len(value) > MAX_PLAIN_EMAIL:
        return None
    match = PLAIN_EMAIL.fullmatch(value)
    if match is None:
        return None
    local, domain = match.groups()
    domain = domain.lower()  # what IDNA's UTS-46 mapping does to ASCII
    if (
        "--" in domain  # R-LDH and Punycode labels: email-validator has rules for them
        or local.lower() in _ROLE_MAILBOXES
        or any(domain == name or domain.endswith(f".{name}") for name in SPECIAL_USE_DOMAIN_NAMES)
    ):
        return None
    return f"{local}@{domain}"


def valid_email(value: str) -> str:
    """The normalised address, or pydantic's own `value_error` for an invalid one."""
    plain = plain_email(value)
    return plain if plain is not None else validate_email(value)[1]


class EmailAddress(str):
    """A string field that validates and documents like pydantic's `EmailStr`
    (`{"type": "string", "format": "email"}`), through `valid_email`. A `str`, so
    SQLModel gives a table column of it the same type it gave `EmailStr`."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, _source: type[Any], _handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(valid_email, core_schema.str_schema())

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        field_schema = handler(schema)
        field_schema.update(type="string", format="email")
        return field_schema
