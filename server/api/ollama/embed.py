"""Ollama's embedding routes: POST /api/embed and the legacy POST /api/embeddings.

``/api/embed`` takes ``input`` (a string or a list of strings) and answers ``embeddings``, one
L2-normalised vector per input; ``truncate`` (default true) cuts an input to the context instead of
refusing it. The legacy ``/api/embeddings`` takes one ``prompt`` and answers ``embedding``, not
normalised, as Ollama's own legacy route does; an empty prompt answers an empty vector (clients
use that to load the model). ``options.num_ctx`` bounds the tokens per input (never past the
model's context); other options only steer generation, and ``keep_alive`` is accepted: models stay
resident until the memory budget needs their room.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api import relay
from server.core.embedding import EmbeddingResult, gather, token_inputs
from server.engine.base import EmbeddingRequest
from server.errors import InvalidRequest, Unsupported
from server.scheduler import ModelWorker

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class EmbedBody(_Body):
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(_Body):
    prompt: str


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds, as Ollama reports durations
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


def _context(worker: ModelWorker, options: dict[str, Any] | None) -> int:
    n_ctx = worker.engine.info.n_ctx
    num_ctx = (options or {}).get("num_ctx")
    if num_ctx is None:
        return n_ctx
    if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
        raise InvalidRequest("options.num_ctx must be a positive integer", param="options.num_ctx")
    return min(num_ctx, n_ctx)


async def _run(
    worker: ModelWorker,
    request: Request,
    texts: list[str],
    *,
    truncate: bool,
    n_ctx: int,
    normalize: bool,
    label: str,
) -> EmbeddingResult | None:
    """Embed ``texts``; None when the client left."""
    engine = worker.engine

    tokens = (
        await asyncio.to_thread(
            token_inputs, engine, texts, truncate=truncate, param="input", n_ctx=n_ctx
        )
        if texts
        else []
    )
    try:
        events = (
            await relay.embed(
                worker, EmbeddingRequest(inputs=tokens, normalize=normalize), request, label
            )
            if tokens
            else []
        )
    except relay.ClientGone:
        return None
    return gather(events, len(tokens))


@router.post("/api/embed", response_model=None)
async def embed(body: EmbedBody, request: Request) -> EmbedResponse | None:
    t0 = time.perf_counter_ns()
    worker = await relay.model_worker(request, body.model, kind="embedding")
    if body.dimensions is not None and body.dimensions != worker.engine.info.n_embd:
        raise Unsupported(
            f"model {worker.name!r} returns {worker.engine.info.n_embd}-dimensional vectors and "
            "cannot shorten them",
            param="dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    n_ctx = _context(worker, body.options)
    result = await _run(
        worker,
        request,
        texts,
        truncate=body.truncate,
        n_ctx=n_ctx,
        normalize=True,
        label="api/embed",
    )
    if result is None:
        return None
    return EmbedResponse(
        model=body.model,
        embeddings=[list(v) for v in result.vectors],
        total_duration=time.perf_counter_ns() - t0,
        load_duration=0,
        prompt_eval_count=result.prompt_tokens,
    )


@router.post("/api/embeddings", response_model=None)
async def embeddings(body: EmbeddingsBody, request: Request) -> EmbeddingsResponse | None:
    worker = await relay.model_worker(request, body.model, kind="embedding")
    n_ctx = _context(worker, body.options)
    texts = [body.prompt] if body.prompt else []
    # Ollama's legacy route truncates to the context and returns the pooled vector as it is.
    result = await _run(
        worker,
        request,
        texts,
        truncate=True,
        n_ctx=n_ctx,
        normalize=False,
        label="api/embeddings",
    )
    if result is None:
        return None
    return EmbeddingsResponse(embedding=list(result.vectors[0]) if result.vectors else [])
