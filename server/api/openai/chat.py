"""POST /v1/chat/completions: the GGUF's own chat template renders the prompt."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.api import relay
from server.api.openai import params
from server.api.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
    new_id,
    now,
)
from server.api.openai.streaming import documented, sse, usage
from server.core.budget import completion_budget
from server.core.chat import render_chat
from server.core.prompt_size import check_prompt_bytes
from server.engine.base import Delta, Engine, Event, GenerationRequest, TokenLogprob

router = APIRouter()


def render_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    """Template, size check and tokens: CPU work, so routes call it through relay.blocking."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text, has_bos = render_chat(engine.info, messages)
    check_prompt_bytes(engine, text, param="messages")
    return engine.tokenize(text, add_bos=not has_bos)


def _chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                    for t, lp in e.top.items()
                ],
            )
            for e in entries
        ]
    )


@router.post(
    "/v1/chat/completions", response_model=None, responses=documented(ChatCompletionResponse)
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    worker = await relay.model_worker(request, body.model, keep_alive=body.keep_alive)
    prompt = await relay.blocking(render_prompt, worker.engine, body)
    wanted = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    greq = GenerationRequest(
        prompt=prompt,
        max_tokens=completion_budget(worker.engine.info.n_ctx, len(prompt), wanted),
        sampling=params.sampling_params(body),
        stop=tuple(body.stop),
        n=body.n,
        logprobs=top,
        time_budget_s=params.time_budget(body),
        speculation=params.speculation(body),
    )
    return await respond(worker, greq, request, body, label="chat")


async def respond(worker, greq: GenerationRequest, request: Request, body, *, label: str):
    """Answer in chat-completion shape (also what Mistral's /v1/fim/completions returns)."""
    cid, created, model = new_id("chatcmpl"), now(), worker.name
    try:
        events = await relay.start(worker, greq, request, label)
        if body.stream:
            return sse(_chunks(events, cid, created, model, body, greq.logprobs is not None))
        choices = await relay.collect(events, request, greq.n)
    except relay.ClientGone:
        return None
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=_chat_logprobs(c.logprobs) if greq.logprobs is not None else None,
                finish_reason=relay.finish_reason(c.finish),
            )
            for i, c in enumerate(choices)
        ],
        usage=usage([c.finish for c in choices if c.finish is not None]),
    )


async def _chunks(
    events: AsyncIterator[Event], cid: str, created: int, model: str, body, logprobs: bool
) -> AsyncIterator[dict]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, lp=None, finish=None) -> dict:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            **({"usage": None} if include_usage else {}),
        }

    started: set[int] = set()
    finished = []
    async for ev in events:
        if ev.index not in started:  # OpenAI opens every choice with the role
            started.add(ev.index)
            yield chunk(ev.index, {"role": "assistant", "content": ""})
        if isinstance(ev, Delta):
            lp = _chat_logprobs(list(ev.logprobs)).model_dump() if logprobs else None
            yield chunk(ev.index, {"content": ev.text}, lp)
        else:
            finished.append(ev)
            yield chunk(ev.index, {}, None, relay.finish_reason(ev))
    if include_usage:
        yield {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(finished).model_dump(),
        }
