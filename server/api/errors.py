"""The one place errors become HTTP responses; each dialect renders them in its own envelope.

Every failure (domain errors, request validation, unknown routes, anything unexpected) is first
described as an ``ApiError``; the renderer of the dialect that owns the request path shapes it
(OpenAI's ``{"error": {...}}`` by default, Ollama's ``{"error": "..."}``, llama-server's own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from server.errors import CodeserveError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    type: str  # OpenAI's error type ("invalid_request_error", "server_error", ...)
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    @classmethod
    def of(cls, exc: CodeserveError) -> ApiError:
        return cls(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)

    @classmethod
    def unexpected(cls, exc: BaseException) -> ApiError:
        """A bug or engine failure: its type and text, never a traceback (that goes to the log)."""
        return cls(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


Renderer = Callable[[ApiError], Response]


def _field_path(loc: Sequence[Any], body: Any, *, missing: bool) -> str:
    """The request-field path of a pydantic error location, without its union-member tags.

    Pydantic inserts the member it tried ("str", "list[int]", "function-after[...]") into the
    location of an error inside a union. Walking the location through the request body tells real
    keys and indices from those tags, whatever a field is called. For a "missing" error the last
    part is the absent field itself.
    """
    if not loc or loc[0] != "body":
        return ".".join(str(x) for x in loc[1:] or loc)
    parts: list[str] = []
    node = body
    rest = list(loc[1:])
    for i, part in enumerate(rest):
        walkable = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if walkable:
            node = node[part]
        elif missing and i == len(rest) - 1 and isinstance(part, str):
            pass  # the absent field
        else:
            continue  # a union member's tag
        parts.append(str(part))
    return ".".join(parts)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    found: list[tuple[str, str, str]] = []  # (field, error type, message)
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            return (
                f"Request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                None,
            )
        field = _field_path(e.get("loc", ()), exc.body, missing=e.get("type") == "missing")
        found.append((field, e.get("type", ""), e["msg"]))
    # Where one union member had the right type but a bad value, the other members' "should be
    # a valid string" (there or above it) is noise: keep what is wrong with the value.
    valued = [f for f, t, _ in found if not t.endswith("_type")]

    def noise(field: str, type_: str) -> bool:
        return type_.endswith("_type") and any(
            v == field or v.startswith(field + ".") or not field for v in valued
        )

    kept = [(f, m) for f, t, m in found if not noise(f, t)]
    messages = [f"{field or 'body'}: {msg}" for field, msg in kept]
    param = next((f for f, _ in kept if f), None)
    return "; ".join(dict.fromkeys(messages)) or "invalid request", param


Respond = Callable[[str, ApiError], Response]


def install(
    app: FastAPI, default: Renderer, by_prefix: Sequence[tuple[str, Renderer]] = ()
) -> Respond:
    """Route every error to the renderer of the first matching path prefix, else ``default``.

    Returns the function that renders an ``ApiError`` for a path, for ASGI middleware that answers
    before routing (host checks, body limits).
    """

    def respond_path(path: str, err: ApiError) -> Response:
        render = next((r for prefix, r in by_prefix if path.startswith(prefix)), default)
        # A lone surrogate from the request must not make the error itself unencodable.
        safe = err.message.encode("utf-8", "backslashreplace").decode("utf-8")
        response = render(replace(err, message=safe))
        if err.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        for k, v in (err.headers or {}).items():
            response.headers[k] = v
        return response

    def respond(request: Request, err: ApiError) -> Response:
        return respond_path(request.url.path, err)

    @app.exception_handler(CodeserveError)
    async def _domain(request: Request, exc: CodeserveError) -> Response:
        return respond(request, ApiError.of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(exc)
        return respond(request, ApiError(400, message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; a path
            # served by several routes (GET and DELETE of one resource) allows all of theirs.
            headers = {**(headers or {}), "Allow": ", ".join(_methods_for(app, request.scope))}
        err = ApiError(exc.status_code, str(exc.detail), type_, headers=headers)
        return respond(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return respond(request, ApiError.unexpected(exc))

    return respond_path


def _methods_for(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at this path (asked method by method: included routers
    answer for their routes)."""
    methods = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    return [
        m
        for m in methods
        if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in app.router.routes)
    ]


def document(
    app: FastAPI,
    default: type[BaseModel],
    by_prefix: Sequence[tuple[str, type[BaseModel]]] = (),
) -> None:
    """Make the OpenAPI document say what the handlers above answer.

    FastAPI documents a 422 ``HTTPValidationError`` for every route with parameters; here a bad
    request is a 400 in the dialect's envelope, and every other error status uses that envelope
    too (the ``default`` response), unless a route documents a status of its own.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, operations in schema.get("paths", {}).items():
            model = next((m for prefix, m in by_prefix if path.startswith(prefix)), default)
            name = model.__name__
            if name not in schemas:
                defs = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(defs.pop("$defs", {}))
                schemas[name] = defs
            envelope = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                responses.setdefault("400", {"description": "Invalid request", "content": envelope})
                responses.setdefault(
                    "default", {"description": "Any other error", "content": envelope}
                )
        if not _references(schema, "HTTPValidationError"):
            schemas.pop("HTTPValidationError", None)
            if not _references(schema, "ValidationError"):
                schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _references(schema: dict[str, Any], name: str) -> bool:
    ref = f"#/components/schemas/{name}"

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("$ref") == ref or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(schema)
