"""The OpenAPI 3.1 document, generated from the routes and the models.

Each handler declares its operation with `@operation(...)` next to its code;
`openapi_document` walks the app's routes and turns those declarations, and
the pydantic JSON schemas of the models they name, into one document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema
from starlette.convertors import UUIDConvertor
from starlette.routing import BaseRoute, Route

from service.idempotency import HEADER as IDEMPOTENCY_HEADER
from service.idempotency import MAX_KEY_LENGTH, REPLAYED_HEADER
from service.pagination import MAX_LIMIT
from service.routing import MethodRoute

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
PROBLEM_MEDIA_TYPE = "application/problem+json"
# Errors any data route can answer, whatever it does.
COMMON_ERRORS = (401, 404, 500, 503)
BODY_ERRORS = (400, 413, 415, 422)
# A bad Idempotency-Key, the key's request still running, the key used for another request.
IDEMPOTENCY_ERRORS = {400, 409, 422}


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem; `errors` is present on 422 only."""

    model_config = ConfigDict(extra="forbid")

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    errors: list[ValidationIssue] | None = None


@dataclass(frozen=True)
class Operation:
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    paginated: bool = False
    media_type: str = "application/json"
    public: bool = False
    also: tuple[int, ...] = ()


_OPERATIONS: dict[Callable[..., Any], Operation] = {}


def operation(
    summary: str,
    *,
    response: type[BaseModel] | None,
    status: int = 200,
    body: type[BaseModel] | None = None,
    errors: tuple[int, ...] = (),
    paginated: bool = False,
    media_type: str = "application/json",
    public: bool = False,
    also: tuple[int, ...] = (),
) -> Callable[[HandlerT], HandlerT]:
    """Declare what a handler accepts and answers, for the OpenAPI document.

    `errors` are answered as problems; `also` are statuses answered with the same
    body as success (a failing health check); `public` routes need no API key.
    """

    def register(handler: HandlerT) -> HandlerT:
        _OPERATIONS[handler] = Operation(
            summary=summary,
            response=response,
            status=status,
            body=body,
            errors=errors,
            paginated=paginated,
            media_type=media_type,
            public=public,
            also=also,
        )
        return handler

    return register


def _schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _path_and_parameters(route: Route) -> tuple[str, list[dict[str, Any]]]:
    path = route.path
    parameters = []
    for name, convertor in route.param_convertors.items():
        path = path.replace(f"{{{name}:uuid}}", f"{{{name}}}")
        schema = (
            {"type": "string", "format": "uuid"}
            if isinstance(convertor, UUIDConvertor)
            else {"type": "string"}
        )
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return path, parameters


def _page_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
        },
        {
            "name": "cursor",
            "in": "query",
            "required": False,
            "description": "next_cursor from the previous page",
            "schema": {"type": "string"},
        },
    ]


def _idempotency_key_parameter() -> dict[str, Any]:
    return {
        "name": IDEMPOTENCY_HEADER,
        "in": "header",
        "required": False,
        "description": (
            "Makes a retry safe: a repeat with the same key and the same request gets "
            f"the first response again (with {REPLAYED_HEADER}: true); 422 if the key was "
            "used for another request, 409 while the first is still running, 400 for a "
            "bad key"
        ),
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "pattern": "^[\\x20-\\x7e]+$",
        },
    }


def _responses(op: Operation, *, with_content: bool, idempotent: bool) -> dict[str, Any]:
    """Success and problem responses; HEAD answers carry no content to describe."""
    responses: dict[str, Any] = {}
    for status in (op.status, *op.also):
        responses[str(status)] = {"description": HTTPStatus(status).phrase}
        if op.response is not None and with_content:
            responses[str(status)]["content"] = {
                op.media_type: {"schema": _schema_ref(op.response)}
            }
    if idempotent:
        responses[str(op.status)]["headers"] = {
            REPLAYED_HEADER: {
                "description": "true when this is the stored response to an earlier request",
                "schema": {"type": "string", "enum": ["true"]},
            }
        }
    statuses = set(op.errors) | {500}
    if idempotent:
        statuses |= IDEMPOTENCY_ERRORS
    if not op.public:
        statuses |= set(COMMON_ERRORS)
    if op.body is not None:
        statuses |= set(BODY_ERRORS)
    if op.paginated:
        statuses.add(422)
    for status in sorted(statuses):
        responses[str(status)] = {"description": HTTPStatus(status).phrase}
        if with_content:
            responses[str(status)]["content"] = {
                PROBLEM_MEDIA_TYPE: {"schema": _schema_ref(Problem)}
            }
    return responses


def _method_operation(
    op: Operation, method: str, parameters: list[dict[str, Any]]
) -> dict[str, Any]:
    idempotent = method == "POST"
    spec: dict[str, Any] = {
        "summary": op.summary,
        "responses": _responses(op, with_content=method != "HEAD", idempotent=idempotent),
    }
    params = parameters + (_page_parameters() if op.paginated else [])
    if idempotent:
        params.append(_idempotency_key_parameter())
    if params:
        spec["parameters"] = params
    if op.body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema_ref(op.body)}},
        }
    if op.public:
        spec["security"] = []
    return spec


def _components(operations: Sequence[Operation]) -> dict[str, Any]:
    modes: dict[type[BaseModel], Literal["validation", "serialization"]] = {
        Problem: "serialization"
    }
    for op in operations:
        if op.body is not None:
            modes[op.body] = "validation"
        if op.response is not None:
            modes.setdefault(op.response, "serialization")
    _, schema = models_json_schema(list(modes.items()), ref_template="#/components/schemas/{model}")
    return schema.get("$defs", {})


def openapi_document(routes: Sequence[BaseRoute], *, title: str, version: str) -> dict[str, Any]:
    """Build the document for every route whose handler declared an operation."""
    paths: dict[str, dict[str, Any]] = {}
    declared: list[Operation] = []
    for route in routes:
        if not isinstance(route, MethodRoute):
            continue
        path, parameters = _path_and_parameters(route)
        for method, handler in route.handlers.items():
            op = _OPERATIONS[handler]
            declared.append(op)
            paths.setdefault(path, {})[method.lower()] = _method_operation(op, method, parameters)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": _components(declared),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
