"""POST /api/generate: a prompt (through the chat template unless ``raw``), or fill-in-the-middle
with ``suffix``; an empty prompt only loads the model (and with ``keep_alive`` 0 unloads it)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api import relay
from server.api.ollama import names
from server.api.ollama.answer import Clock, answer, load_or_unload, refuse_common
from server.api.ollama.options import Options, parse_options
from server.api.ollama.protocol import GenerateChunk, GenerateRequest, Logprob
from server.api.ollama.streaming import STREAMED
from server.core.budget import completion_budget
from server.core.chat import render_chat
from server.core.fim_request import fim_prompt
from server.engine.base import Engine, GenerationRequest
from server.errors import InvalidRequest, Unsupported

router = APIRouter()


def _prompt(engine: Engine, body: GenerateRequest, opts: Options, n_ctx: int) -> list[int]:
    if body.suffix:
        for field, value in (("raw", body.raw), ("system", body.system), ("context", body.context)):
            if value:
                raise Unsupported(f"{field} cannot be combined with suffix", param=field)
        return fim_prompt(
            engine, body.prompt, body.suffix, max_tokens=opts.num_predict, n_ctx=n_ctx
        )
    if body.raw:
        return engine.tokenize(body.prompt, add_bos=True)
    before = list(body.context or [])
    if any(t < 0 or t >= engine.info.n_vocab for t in before):
        raise InvalidRequest(
            f"context: token ids must be in [0, {engine.info.n_vocab})", param="context"
        )
    if engine.info.chat_template:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        messages.append({"role": "user", "content": body.prompt})
        text, has_bos = render_chat(engine.info, messages)
        if has_bos and before:  # the conversation so far already starts with it
            text, has_bos = text[len(engine.info.bos_token) :], True
        return before + engine.tokenize(text, add_bos=not has_bos and not before)
    if body.system:  # Ollama's template for such a model is the bare prompt: nowhere to put it
        raise Unsupported(
            "system: this model has no chat template to place a system prompt in; use raw "
            "with the prompt written out, or set chat_template for it in models.toml",
            param="system",
        )
    return before + engine.tokenize(body.prompt, add_bos=not before)


@router.post("/api/generate", response_model=None, responses=STREAMED)
async def generate(body: GenerateRequest, request: Request) -> Response | None:
    clock = Clock.starting()
    name = names.resolve(request.app.state.manager.registry, body.model)
    refuse_common(body)
    if body.images:
        raise Unsupported("images: no multimodal models are served", param="images")
    if body.template:
        raise Unsupported(
            "template: custom prompt templates are not supported; the model's own chat "
            "template is used (or send raw: true with the prompt written out)",
            param="template",
        )
    if body.raw and (body.system or body.context):
        raise InvalidRequest("raw mode does not support template, system, or context", param="raw")

    def done_shape(reason: str) -> GenerateChunk:
        return GenerateChunk(model=body.model, response="", done=True, done_reason=reason)

    if not body.prompt and not body.suffix:
        return await load_or_unload(request, body, name, done_shape)

    worker = await relay.model_worker(request, name, keep_alive=body.keep_alive)
    clock = clock.ready()
    engine = worker.engine
    opts = parse_options(body.options, engine.info.n_ctx)
    n_ctx = opts.num_ctx or engine.info.n_ctx
    prompt = await asyncio.to_thread(_prompt, engine, body, opts, n_ctx)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(n_ctx, len(prompt), opts.num_predict),
        sampling=opts.sampling,
        stop=opts.stop,
        logprobs=body.top_logprobs if body.logprobs else None,
        stream=body.streaming,
    )
    # Ollama hands back the conversation as token ids, for the next request's `context`.
    keeps_context = not body.raw and not body.suffix

    def shape(
        text: str, lp: list[Logprob] | None, final: dict[str, Any] | None, tokens: list[int]
    ) -> GenerateChunk:
        context = prompt + tokens if final is not None and keeps_context else None
        return GenerateChunk(
            model=body.model,
            response=text,
            done=final is not None,
            context=context,
            logprobs=lp,
            **(final or {}),
        )

    return await answer(
        request, worker, greq, stream=body.streaming, clock=clock, shape=shape, label="generate"
    )
