"""POST /v1/fim/completions: Mistral's fill-in-the-middle route (prompt + suffix).

Clients of this route (Codestral-style providers) read chat-shaped responses, so it answers like
/v1/chat/completions; the prompt is built from the model's FIM tokens like `suffix` on
/v1/completions.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request, Response

from server.api import relay
from server.api.openai import chat, params
from server.api.openai.chat_protocol import ChatCompletionResponse
from server.api.openai.protocol import FimCompletionRequest
from server.api.openai.streaming import documented
from server.core.budget import completion_budget
from server.core.fim_request import fim_prompt
from server.core.prompt_size import trim_fim
from server.engine.base import Engine, GenerationRequest
from server.engine.fim import ExtraFile

router = APIRouter()


def _fim_tokens(engine: Engine, body: FimCompletionRequest) -> list[int]:
    prefix, suffix = trim_fim(engine, body.prompt, body.suffix or "")
    return fim_prompt(
        engine,
        prefix,
        suffix,
        max_tokens=body.max_tokens,
        extra=[ExtraFile(f.filename, f.text) for f in body.input_extra],
        filename=body.filename,
    )


@router.post(
    "/v1/fim/completions", response_model=None, responses=documented(ChatCompletionResponse)
)
async def create_fim_completion(
    body: FimCompletionRequest, request: Request
) -> Response | ChatCompletionResponse | None:
    worker = await relay.model_worker(request, body.model, keep_alive=body.keep_alive)
    engine = worker.engine
    chars = len(body.prompt) + len(body.suffix or "")
    prompt = await relay.tokenizing(chars, _fim_tokens, engine, body)
    sampling = params.sampling_params(body)
    if body.random_seed is not None and body.seed is None:
        sampling = replace(sampling, seed=body.random_seed)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(engine.info.n_ctx, len(prompt), body.max_tokens),
        sampling=sampling,
        stop=tuple(body.stop),
        n=body.n,
        time_budget_s=params.time_budget(body),
        speculation=params.speculation(body),
        stream=body.stream,
    )
    return await chat.respond(worker, greq, request, body, label="fim")
