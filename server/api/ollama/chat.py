"""POST /api/chat: messages rendered with the model's own chat template, answered as Ollama does;
no messages only loads the model (and with ``keep_alive`` 0 unloads it)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api import relay
from server.api.ollama import names
from server.api.ollama.answer import Clock, answer, load_or_unload, refuse_common
from server.api.ollama.options import parse_options
from server.api.ollama.protocol import ChatChunk, ChatMessageOut, ChatRequest, Logprob
from server.api.ollama.streaming import STREAMED
from server.core.budget import completion_budget
from server.core.chat import chat_prompt
from server.engine.base import GenerationRequest
from server.errors import InvalidRequest, Unsupported

router = APIRouter()

_ROLES = ("system", "user", "assistant")


def _messages(body: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        if m.role not in _ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: {m.role!r} is not one of {', '.join(_ROLES)}",
                param=f"messages[{i}].role",
            )
        if m.images:
            raise Unsupported(
                f"messages[{i}].images: no multimodal models are served",
                param=f"messages[{i}].images",
            )
        if m.tool_calls:
            raise Unsupported(
                f"messages[{i}].tool_calls: tool calling is not supported on the Ollama API yet",
                param=f"messages[{i}].tool_calls",
            )
        out.append({"role": m.role, "content": m.content or ""})
    return out


@router.post("/api/chat", response_model=None, responses=STREAMED)
async def chat(body: ChatRequest, request: Request) -> Response | None:
    clock = Clock.starting()
    name = names.resolve(request.app.state.manager.registry, body.model)
    refuse_common(body)
    if body.tools:
        raise Unsupported(
            "tools: tool calling is not supported on the Ollama API yet", param="tools"
        )
    messages = _messages(body)

    def done_shape(reason: str) -> ChatChunk:
        return ChatChunk(
            model=body.model, message=ChatMessageOut(content=""), done=True, done_reason=reason
        )

    if not messages:
        return await load_or_unload(request, body, name, done_shape)

    worker = await relay.model_worker(request, name, keep_alive=body.keep_alive)
    clock = clock.ready()
    engine = worker.engine
    opts = parse_options(body.options, engine.info.n_ctx)
    n_ctx = opts.num_ctx or engine.info.n_ctx
    prompt = await asyncio.to_thread(chat_prompt, engine, messages)
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(n_ctx, len(prompt), opts.num_predict),
        sampling=opts.sampling,
        stop=opts.stop,
        logprobs=body.top_logprobs if body.logprobs else None,
        stream=body.streaming,
    )

    def shape(
        text: str, lp: list[Logprob] | None, final: dict[str, Any] | None, tokens: list[int]
    ) -> ChatChunk:
        return ChatChunk(
            model=body.model,
            message=ChatMessageOut(content=text),
            done=final is not None,
            logprobs=lp,
            **(final or {}),
        )

    return await answer(
        request, worker, greq, stream=body.streaming, clock=clock, shape=shape, label="chat"
    )
