"""Every error a client can get, and how database failures map onto them.

    ServiceError                  any error answered as application/problem+json
    ├── BadRequest                400  body is not JSON, or not a JSON object
    ├── Unauthorized              401  missing or unknown bearer token
    ├── NotFound                  404  unknown route or id
    ├── Conflict                  409  unique constraint, a concurrent change, or a deadlock
    ├── PreconditionFailed        412  If-Match does not match
    ├── PayloadTooLarge           413  body over MAX_BODY_BYTES
    ├── UnsupportedMediaType      415  body is not application/json
    ├── ValidationFailed          422  with a list of {loc, msg}
    └── ServiceUnavailable        503  database unreachable, pool exhausted, timed out

Handlers raise these; `service.problems` renders them, and turns database
exceptions into them with `from_database_error`.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar, get_args

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.exc import StaleDataError

RowT = TypeVar("RowT")
RETRY_AFTER_SECONDS = 5
# A 422 lists at most this many errors, and counts the rest: a body of 95,000
# unknown fields must not cost a 6 MB answer.
MAX_LISTED_ERRORS = 50
# sqlstates that mean "try again later": connection lost, server shutting
# down or overloaded, query cancelled by statement_timeout.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57")
# What drivers raise, unwrapped, when the server cannot be reached or stops answering.
UNREACHABLE = (ConnectionError, TimeoutError, socket.gaierror)
# Class 40, "transaction rollback": a deadlock victim (40P01), a serialization
# failure (40001). The transaction changed nothing; running it again may succeed.
_TRANSACTION_ROLLBACK_CLASS = "40"
CONFLICT_RETRY_AFTER_SECONDS = 1
_QUERY_CANCELED = "57014"  # statement_timeout ran out (or a DBA cancelled the query)
_UNIQUE_VIOLATION = "23505"
_FOREIGN_KEY_VIOLATION = "23503"
_EMAIL_TAKEN = ("email", "a user with this email already exists")
# What a unique index means to a client, by index name (SQLite names a
# one-column index by its column instead).
UNIQUE_FIELDS: Mapping[str, tuple[str, str]] = {
    "uq_users_email_lower": _EMAIL_TAKEN,
    "uq_users_email_key": _EMAIL_TAKEN,
    "users.email_key": _EMAIL_TAKEN,
}


class ServiceError(Exception):
    """Base class: an error with an HTTP status and a detail a person can act on."""

    status: ClassVar[int] = 500

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})

    def extra(self) -> dict[str, Any]:
        """Extension members added to the problem body."""
        return {}


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ServiceError):
    status = 404


def found(row: RowT | None, what: str) -> RowT:
    """The row, or NotFound naming what was missing (crud returns None for that)."""
    if row is None:
        raise NotFound(f"{what} not found")
    return row


class Conflict(ServiceError):
    status = 409


class PreconditionFailed(ServiceError):
    status = 412


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class ValidationFailed(ServiceError):
    status = 422

    def __init__(self, errors: Sequence[Mapping[str, Any]], *, omitted: int = 0) -> None:
        """`omitted`: errors found but not passed in, counted with those past the cap."""
        super().__init__("the request is not valid; see errors")
        listed = errors[:MAX_LISTED_ERRORS]
        self.errors = [{"loc": list(e["loc"]), "msg": str(e["msg"])} for e in listed]
        self.omitted = len(errors) - len(listed) + omitted

    @classmethod
    def single(cls, loc: Sequence[str | int], msg: str) -> ValidationFailed:
        return cls([{"loc": loc, "msg": msg}])

    def extra(self) -> dict[str, Any]:
        if self.omitted:
            return {"errors": self.errors, "errors_omitted": self.omitted}
        return {"errors": self.errors}


# Why a 503 was answered, as the metrics count them.
UnavailableCause = Literal["database_down", "pool_timeout", "statement_timeout"]
UNAVAILABLE_CAUSES: tuple[UnavailableCause, ...] = get_args(UnavailableCause)


class ServiceUnavailable(ServiceError):
    status = 503

    def __init__(self, detail: str, *, cause: UnavailableCause = "database_down") -> None:
        super().__init__(detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.cause = cause


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error wrapped by SQLAlchemy, when the driver gives one."""
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def _sqlite_error_name(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    return getattr(orig, "sqlite_errorname", "") if isinstance(orig, sqlite3.Error) else ""


def is_foreign_key_violation(error: sa_exc.IntegrityError) -> bool:
    return (
        sqlstate_of(error) == _FOREIGN_KEY_VIOLATION
        or _sqlite_error_name(error) == "SQLITE_CONSTRAINT_FOREIGNKEY"
    )


def is_transaction_conflict(error: BaseException) -> bool:
    """PostgreSQL aborted the transaction to resolve a conflict with another."""
    return (sqlstate_of(error) or "").startswith(_TRANSACTION_ROLLBACK_CLASS)


def _unique_field(error: sa_exc.IntegrityError) -> tuple[str, str] | None:
    text = str(error.orig)
    for index_name, field in UNIQUE_FIELDS.items():
        if index_name in text:
            return field
    return None


def from_database_error(error: BaseException) -> ServiceError | None:
    """The client-facing error for a database failure, or None if it is a bug (500)."""
    if isinstance(error, sa_exc.TimeoutError):
        return ServiceUnavailable(
            "no database connection became free in time; retry later", cause="pool_timeout"
        )
    if isinstance(error, sa_exc.IntegrityError):
        if is_foreign_key_violation(error):
            return NotFound("the resource this refers to does not exist")
        unique = _unique_field(error)
        if unique is not None or sqlstate_of(error) == _UNIQUE_VIOLATION:
            return Conflict(unique[1] if unique else "this would duplicate an existing resource")
        return None
    if isinstance(error, StaleDataError):
        return Conflict("the resource changed while this request updated it; retry")
    if is_transaction_conflict(error):
        return Conflict(
            "the database aborted this request to resolve a conflict with another "
            "(a deadlock or serialization failure), also when it was run again; retry",
            headers={"Retry-After": str(CONFLICT_RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, UNREACHABLE):
        return ServiceUnavailable("the database did not answer in time; retry later")
    if isinstance(error, sa_exc.DBAPIError):
        sqlstate = sqlstate_of(error) or ""
        if (
            error.connection_invalidated
            or isinstance(error, sa_exc.InterfaceError)
            or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
            or isinstance(error.orig, UNREACHABLE)
            or _sqlite_error_name(error) in {"SQLITE_BUSY", "SQLITE_LOCKED"}
        ):
            timed_out = sqlstate == _QUERY_CANCELED or _sqlite_error_name(error) == "SQLITE_BUSY"
            return ServiceUnavailable(
                "the database is unavailable; retry later",
                cause="statement_timeout" if timed_out else "database_down",
            )
    return None
