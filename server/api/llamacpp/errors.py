"""llama-server's error envelope: ``{"error": {"code": 400, "message": "...", "type": "..."}}``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.api.errors import ApiError

# Route prefixes whose errors take this shape (GET /health keeps its own).
PREFIXES = ("/completion", "/infill", "/tokenize", "/detokenize", "/props", "/slots")

# llama-server's error types by status; context overflow has its own.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "unavailable_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def envelope(err: ApiError) -> dict[str, Any]:
    if err.code == "context_length_exceeded":
        kind = "exceed_context_size_error"
    else:
        fallback = "server_error" if err.status >= 500 else "invalid_request_error"
        kind = _TYPES.get(err.status, fallback)
    message = err.message
    if err.param is not None and err.param not in message:
        message = f"{err.param}: {message}"  # llama-server's shape has no param: name it here
    return {"error": {"code": err.status, "message": message, "type": kind}}


def render(err: ApiError) -> JSONResponse:
    return JSONResponse(envelope(err), status_code=err.status)


class _LlamaServerErrorBody(BaseModel):
    code: int
    message: str
    type: str


class LlamaServerError(BaseModel):
    """llama-server's error envelope, for the OpenAPI document."""

    error: _LlamaServerErrorBody
