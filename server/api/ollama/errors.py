"""Ollama's error envelope: ``{"error": "message"}`` with the HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from server.api.errors import ApiError


class OllamaError(BaseModel):
    """Ollama's error envelope, for the OpenAPI document."""

    error: str


def render(err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)
