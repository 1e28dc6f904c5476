"""Ollama's embedding routes: POST /api/embed and the legacy POST /api/embeddings.

``/api/embed`` takes ``input`` (a string or a list of strings) and answers ``embeddings``, one
L2-normalised vector per input; ``truncate`` (default true) cuts an input to the context instead of
refusing it. The legacy ``/api/embeddings`` takes one ``prompt`` and answers ``embedding``, not
normalised, as Ollama's own legacy route does. An empty input only loads the model (``keep_alive:
0`` unloads it), as on the other routes. ``options`` are checked as everywhere in this dialect;
``num_ctx`` bounds the tokens per input, the sampling options have nothing to steer here.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api import relay
from server.api.ollama import names
from server.api.ollama.answer import Clock
from server.api.ollama.options import parse_options
from server.core.embedding import EmbeddingResult, gather, token_inputs
from server.engine.base import EmbeddingRequest
from server.errors import Unsupported
from server.keepalive import KeepAlive

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive | None = None


class EmbedBody(_Body):
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)


class EmbeddingsBody(_Body):
    prompt: str = ""


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds, as Ollama reports durations
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


async def _embed(
    request: Request,
    body: _Body,
    texts: list[str],
    *,
    truncate: bool,
    normalize: bool,
    label: str,
    dimensions: int | None = None,
) -> tuple[str, EmbeddingResult, Clock] | None:
    """Embed ``texts`` with the body's model; None when the client left."""
    clock = Clock.starting()
    manager = request.app.state.manager
    name = names.resolve(manager.registry, body.model)
    if not texts and body.keep_alive == 0:
        await manager.request_unload(name)
        return name, EmbeddingResult(vectors=[], prompt_tokens=0), clock
    worker = await relay.model_worker(request, name, keep_alive=body.keep_alive, kind="embedding")
    clock = clock.ready()
    engine = worker.engine
    if dimensions is not None and dimensions != engine.info.n_embd:
        raise Unsupported(
            f"dimensions: model {name!r} returns {engine.info.n_embd}-dimensional vectors and "
            "cannot shorten them",
            param="dimensions",
        )
    opts = parse_options(body.options, engine.info.n_ctx)
    tokens = await asyncio.to_thread(
        token_inputs, engine, texts, truncate=truncate, param="input", n_ctx=opts.num_ctx
    )
    ereq = EmbeddingRequest(inputs=tokens, normalize=normalize)
    try:
        events = await relay.embed(worker, ereq, request, label)
    except relay.ClientGone:
        return None
    return name, gather(events, len(tokens)), clock


@router.post("/api/embed", response_model=None)
async def embed(body: EmbedBody, request: Request) -> EmbedResponse | None:
    texts = [body.input] if isinstance(body.input, str) else body.input
    done = await _embed(
        request,
        body,
        texts,
        truncate=body.truncate,
        normalize=True,
        label="api/embed",
        dimensions=body.dimensions,
    )
    if done is None:
        return None
    _, result, clock = done
    return EmbedResponse(
        model=body.model,
        embeddings=[list(v) for v in result.vectors],
        total_duration=int((time.perf_counter() - clock.start) * 1e9),
        load_duration=clock.load_ns(),
        prompt_eval_count=result.prompt_tokens,
    )


@router.post("/api/embeddings", response_model=None)
async def embeddings(body: EmbeddingsBody, request: Request) -> EmbeddingsResponse | None:
    # Ollama's legacy route truncates to the context and returns the pooled vector as it is.
    texts = [body.prompt] if body.prompt else []
    done = await _embed(
        request, body, texts, truncate=True, normalize=False, label="api/embeddings"
    )
    if done is None:
        return None
    vectors = done[1].vectors
    return EmbeddingsResponse(embedding=list(vectors[0]) if vectors else [])
