"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from server.api.errors import ApiError
from server.api.openai.protocol import ErrorBody, ErrorResponse


def render(err: ApiError) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code)
    )
    return JSONResponse(body.model_dump(), status_code=err.status)
