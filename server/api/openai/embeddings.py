"""POST /v1/embeddings: one vector per input, in OpenAI's shape (Continue's codebase index).

``input`` is a string, a list of strings, a list of token ids or a list of those; each becomes one
L2-normalised vector, as OpenAI returns them. ``encoding_format: "base64"`` (what the ``openai``
SDK asks for by default) sends each vector as little-endian float32 bytes. ``dimensions`` cannot
shorten this model's vectors, so anything but the model's own length is a 400.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api import relay
from server.core.embedding import gather, token_inputs
from server.engine.base import EmbeddingRequest
from server.errors import InvalidRequest, Unsupported

router = APIRouter()


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted for compatibility; it changes nothing


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def _inputs(body: EmbeddingsBody) -> list[str | list[int]]:
    value = body.input
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequest("input is an empty list", param="input")
    ids = [x for x in value if isinstance(x, int)]
    if len(ids) == len(value):
        return [ids]  # one input given as token ids
    return [x for x in value if not isinstance(x, int)]


def _encode(vector: tuple[float, ...], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingsBody, request: Request) -> EmbeddingsResponse | None:
    worker = await relay.model_worker(request, body.model, kind="embedding")
    engine = worker.engine
    if body.dimensions is not None and body.dimensions != engine.info.n_embd:
        raise Unsupported(
            f"model {worker.name!r} returns {engine.info.n_embd}-dimensional vectors and cannot "
            f"shorten them; omit `dimensions` or set it to {engine.info.n_embd}",
            param="dimensions",
        )
    inputs = _inputs(body)
    tokens = await asyncio.to_thread(token_inputs, engine, inputs, truncate=False, param="input")
    try:
        events = await relay.embed(worker, EmbeddingRequest(inputs=tokens), request, "embeddings")
    except relay.ClientGone:
        return None  # nobody is left to answer
    result = gather(events, len(tokens))
    return EmbeddingsResponse(
        data=[
            EmbeddingData(index=i, embedding=_encode(v, body.encoding_format))
            for i, v in enumerate(result.vectors)
        ],
        model=worker.name,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
