"""The one place errors become HTTP responses, in OpenAI's envelope.

``{"error": {"message", "type", "param", "code"}}`` for domain errors, request validation
failures (malformed JSON, wrong types, out-of-range values), unknown routes, and anything else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.protocol import ErrorBody, ErrorResponse
from server.errors import CodeserveError

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def render(exc: CodeserveError) -> JSONResponse:
    return error_response(
        exc.status_code, exc.message, exc.error_type, param=exc.param, code=exc.code
    )


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


def install(app: FastAPI) -> None:
    @app.exception_handler(CodeserveError)
    async def _domain(_: Request, exc: CodeserveError) -> JSONResponse:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, "invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
