"""Model lifecycle on the OpenAI side (codeserve extensions; Ollama's equivalents live in /api/*).

- ``POST /v1/models/{name}/load``: load a model now; body ``{"keep_alive": "10m"}`` optional.
- ``POST /v1/models/{name}/unload``: unload it now, or as soon as its running requests end.
- ``GET /v1/resident_models``: the models in memory, their size and when they unload.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from server.keepalive import KeepAlive

router = APIRouter()


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_alive: KeepAlive | None = None


class ResidentModel(BaseModel):
    id: str
    object: str = "model"
    memory_bytes: int
    n_ctx: int
    busy: bool
    keep_alive: float | None  # seconds once idle; None: never unloaded when idle
    expires_at: float | None  # unix time; None: no deadline
    loaded_at: float


class ResidentList(BaseModel):
    object: str = "list"
    data: list[ResidentModel]


def _resident(request: Request) -> ResidentList:
    def finite(x: float) -> float | None:
        return None if math.isinf(x) else x

    return ResidentList(
        data=[
            ResidentModel(
                id=r.name,
                memory_bytes=r.memory_bytes,
                n_ctx=r.n_ctx,
                busy=r.busy,
                keep_alive=finite(r.keep_alive_s),
                expires_at=finite(r.expires_at),
                loaded_at=r.loaded_at,
            )
            for r in request.app.state.manager.resident()
        ]
    )


@router.get("/v1/resident_models")
async def resident_models(request: Request) -> ResidentList:
    return _resident(request)


@router.post("/v1/models/{name:path}/load")
async def load_model(name: str, request: Request, body: LoadRequest | None = None) -> ResidentModel:
    manager = request.app.state.manager
    worker = await manager.get(name, keep_alive=body.keep_alive if body else None)
    request.state.model = worker.name
    [row] = [r for r in _resident(request).data if r.id == worker.name]
    return row


@router.post("/v1/models/{name:path}/unload")
async def unload_model(name: str, request: Request) -> dict[str, object]:
    manager = request.app.state.manager
    cfg = manager.config(name)
    was_loaded = await manager.request_unload(cfg.name)
    return {
        "id": cfg.name,
        "object": "model",
        "unloaded": was_loaded and not manager.is_loaded(cfg.name),
        "pending": manager.is_loaded(cfg.name),
    }
