"""GET /health: 503 while the default model loads (or failed to), 200 once it can answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get(
    "/health",
    responses={
        200: {"description": "The default model is loaded"},
        503: {"description": "The default model is loading, or failed to load (`error`)"},
    },
)
async def health(request: Request) -> JSONResponse:
    manager = request.app.state.manager
    name = manager.default_model
    if manager.is_loaded(name):
        return JSONResponse({"status": "ok", "model": name, "loaded": manager.loaded()})
    error = manager.load_errors.get(name)
    status = "error" if error else "loading"
    body = {"status": status, "model": name, **({"error": error} if error else {})}
    return JSONResponse(body, status_code=503)
