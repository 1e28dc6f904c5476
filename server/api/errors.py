"""The one place errors become HTTP responses; each dialect renders them in its own envelope.

Every failure (domain errors, request validation, unknown routes, anything unexpected) is first
described as an ``ApiError``; the renderer of the dialect that owns the request path shapes it
(OpenAI's ``{"error": {...}}`` by default, Ollama's ``{"error": "..."}``, llama-server's own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

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


Renderer = Callable[[ApiError], Response]


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    messages, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return (
                f"Request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}",
                None,
            )
        # Union members show up as extra path parts ("str", "list[int]"); keep the field path.
        field = ".".join(x for x in loc if not x.startswith(("list[", "str", "function-")))
        param = param or field or None
        messages.append(f"{field or 'body'}: {e['msg']}")
    return "; ".join(dict.fromkeys(messages)) or "invalid request", param


def install(
    app: FastAPI, default: Renderer, by_prefix: Sequence[tuple[str, Renderer]] = ()
) -> None:
    """Route every error to the renderer of the first matching path prefix, else ``default``."""

    def respond(request: Request, err: ApiError) -> Response:
        path = request.url.path
        render = next((r for prefix, r in by_prefix if path.startswith(prefix)), default)
        response = render(err)
        if err.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        for k, v in (err.headers or {}).items():
            response.headers[k] = v
        return response

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
        err = ApiError(exc.status_code, str(exc.detail), type_, headers=exc.headers)
        return respond(request, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return respond(request, err)
