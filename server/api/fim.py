"""POST /v1/fim/completions: Mistral's fill-in-the-middle route (prompt + suffix).

Clients of this route (Codestral-style providers) read chat-shaped responses, so it answers like
/v1/chat/completions; the prompt is built from the model's FIM tokens like `suffix` on
/v1/completions.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request

from server.api import chat
from server.api import generation as g
from server.api.protocol import FimCompletionRequest
from server.engine.base import GenerationRequest

router = APIRouter()


@router.post("/v1/fim/completions", response_model=None)
async def create_fim_completion(body: FimCompletionRequest, request: Request):
    worker = await g.model_worker(request, body.model)
    engine = worker.engine
    prompt = g.fim_prompt(engine, body, body.max_tokens)
    sampling = g.sampling_params(body)
    if body.random_seed is not None and body.seed is None:
        sampling = replace(sampling, seed=body.random_seed)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=g.completion_budget(engine.info.n_ctx, len(prompt), body.max_tokens),
        sampling=sampling,
        stop=tuple(body.stop),
        n=body.n,
        time_budget_s=g.time_budget(body),
        speculation=g.speculation(body),
    )
    return await chat.respond(worker, greq, request, body, label="fim")
