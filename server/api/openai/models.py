"""GET /v1/models: every model in the registry (OpenAI lists what may be requested)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.openai.protocol import ErrorResponse, ModelCard, ModelList
from server.errors import ModelNotFound

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    registry = request.app.state.manager.registry
    return ModelList(data=[ModelCard(id=name) for name in registry.models])


@router.get("/v1/models/{name:path}", responses={404: {"model": ErrorResponse}})
async def get_model(name: str, request: Request) -> ModelCard:
    if request.app.state.manager.registry.get(name) is None:
        raise ModelNotFound(f"The model {name!r} does not exist", param="model")
    return ModelCard(id=name)
