"""Reading what a request carries: a JSON body into a model, If-Match, a bearer token."""

from __future__ import annotations

import json
from itertools import islice
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import Request

from service.errors import (
    MAX_LISTED_ERRORS,
    BadRequest,
    PayloadTooLarge,
    PreconditionFailed,
    UnsupportedMediaType,
    ValidationFailed,
)

ModelT = TypeVar("ModelT", bound=BaseModel)
UNKNOWN_FIELD = "Extra inputs are not permitted"  # pydantic's own words for extra="forbid"


def _is_json(content_type: str) -> bool:
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def _read_limited(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be too large."""
    too_large = PayloadTooLarge(f"the body is larger than {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large  # stop reading: the rest never needs to reach memory
        chunks.append(chunk)
    return b"".join(chunks)


async def read_bytes(request: Request) -> bytes:
    """The body, read from the client once and kept in the request's state, so a
    handler run again (after a deadlock) parses the same bytes, and an
    Idempotency-Key check can fingerprint them before the handler parses them."""
    state = request.scope["state"]
    if "body" not in state:
        state["body"] = await _read_limited(request, state["settings"].max_body_bytes)
    body: bytes = state["body"]
    return body


async def read_body(request: Request, model: type[ModelT]) -> ModelT:
    """Parse the body as `model`: 415 not JSON, 413 too large, 400 malformed, 422 invalid."""
    if not _is_json(request.headers.get("content-type", "")):
        raise UnsupportedMediaType("the body must be application/json")
    body = await read_bytes(request)
    try:
        data = json.loads(body)
    except ValueError as exc:  # includes bodies that are not UTF-8
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    # Unknown fields are found here, by one set difference, and only the first few
    # become error objects: pydantic would build one for each of thousands.
    known = model.model_fields.keys()
    unknown = data.keys() - known
    try:
        if not unknown:
            return model.model_validate(data)
        model.model_validate({name: data[name] for name in known if name in data})
        errors: list[dict[str, Any]] = []
    except ValidationError as exc:
        errors = [{"loc": ["body", *error["loc"]], "msg": error["msg"]} for error in exc.errors()]
    listed = list(islice((name for name in data if name in unknown), MAX_LISTED_ERRORS))
    errors += ({"loc": ["body", name], "msg": UNKNOWN_FIELD} for name in listed)
    raise ValidationFailed(errors, omitted=len(unknown) - len(listed))


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def check_if_match(request: Request, current_etag: str) -> None:
    """412 unless If-Match is absent, `*`, or lists the current (strong) ETag."""
    header = request.headers.get("if-match")
    if header is None:
        return
    candidates = {tag.strip() for tag in header.split(",")}
    if "*" not in candidates and current_etag not in candidates:
        raise PreconditionFailed("the resource has changed since the ETag given in If-Match")
