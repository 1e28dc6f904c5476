"""What the completion and chat handlers share: request → GenerationRequest, and event plumbing.

A request is queued, then raced against the client's disconnect until its first event arrives, so
a client that gives up while waiting is dropped from the queue before it costs the model anything;
errors known before that first event (queue full, queue timeout) still become proper HTTP statuses.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from sse_starlette import EventSourceResponse

from server.api.protocol import PromptTokensDetails, Usage
from server.engine.base import (
    Delta,
    Engine,
    Event,
    Finished,
    SamplingParams,
    Speculation,
    TokenLogprob,
)
from server.engine.fim import ExtraFile, build_fim_prompt
from server.errors import CodeserveError, ContextOverflow, InvalidRequest, Unsupported
from server.scheduler import ModelWorker


async def model_worker(request: Request, name: str | None) -> ModelWorker:
    """The worker for a request's model (loading it if needed), labelling the request with it."""
    manager = request.app.state.manager
    worker = await manager.get(name)
    request.state.model = worker.name
    return worker


def fim_prompt(engine: Engine, body, max_tokens: int | None) -> list[int]:
    """Token ids for a fill-in-the-middle request (prompt before the cursor, suffix after)."""
    fim = engine.info.fim
    if fim is None:
        raise Unsupported(
            "this model has no fill-in-the-middle tokens, so it cannot complete with `suffix`; "
            "use a code model (e.g. qwen2.5-coder-1.5b) or send a prompt without suffix",
            param="suffix",
        )
    if not isinstance(body.prompt, str):
        raise InvalidRequest("with `suffix`, `prompt` must be a string", param="prompt")
    n_ctx = engine.info.n_ctx
    reserve = min(max_tokens if max_tokens is not None else n_ctx // 4, n_ctx // 2)
    return build_fim_prompt(
        fim,
        lambda text: engine.tokenize(text, add_bos=False, special=False),
        body.prompt,
        body.suffix or "",
        budget=n_ctx - max(reserve, 1),
        bos=engine.info.bos_id,
        extra=[ExtraFile(f.filename, f.text) for f in body.input_extra],
        filename=body.filename,
    )


def speculation(body) -> Speculation:
    return Speculation(mode=body.speculative, max_draft=body.speculative_max_draft)


def time_budget(body) -> float | None:
    return body.t_max_predict_ms / 1e3 if body.t_max_predict_ms else None


def sampling_params(req) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        seed=req.seed,
    )


def completion_budget(n_ctx: int, prompt_tokens: int, requested: int | None) -> int:
    """Tokens the completion may take: what was asked for, clamped to what the context has left.

    IDE clients send large defaults (Continue: 4096), so an over-large max_tokens is clamped and
    the choice ends with "length", as local servers do; a prompt that leaves no room is a 400.
    """
    room = n_ctx - prompt_tokens
    if room <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{prompt_tokens} tokens; shorten the prompt.",
            param="prompt",
        )
    return room if requested is None else min(requested, room)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before we could answer; nothing is sent."""


async def start(worker: ModelWorker, greq, request: Request, label: str) -> AsyncIterator[Event]:
    """Queue the request and wait for its first event, dropping it if the client leaves first."""
    events = worker.stream(greq, label=label)
    first = asyncio.ensure_future(anext(events))
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()
        raise ClientGone
    gone.cancel()
    head = first.result()  # re-raises Overloaded / QueueTimeout / ModelUnavailable as HTTP errors

    async def chained() -> AsyncIterator[Event]:
        try:
            yield head
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chained()


@dataclass
class Choice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finished | None = None


async def collect(events: AsyncIterator[Event], request: Request, n: int) -> list[Choice]:
    """Gather every event of a non-streamed request; a client that leaves cancels it."""
    choices = [Choice() for _ in range(n)]

    async def consume() -> None:
        async for ev in events:
            c = choices[ev.index]
            if isinstance(ev, Delta):
                c.text += ev.text
                c.logprobs.extend(ev.logprobs)
            else:
                c.finish = ev

    task = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    gone.cancel()
    task.result()
    return choices


def usage(finished: list[Finished]) -> Usage:
    prompt = finished[0].timings.prompt_tokens if finished else 0
    cached = finished[0].timings.cached_tokens if finished else 0
    completion = sum(f.timings.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def sse(chunks: AsyncIterator[dict]) -> EventSourceResponse:
    """OpenAI's stream framing: ``data: {json}`` events, then ``data: [DONE]``."""

    async def frames() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, separators=(",", ":"))}
        except CodeserveError as e:  # after the headers went out, an error is one more event
            yield {
                "data": json.dumps(
                    {
                        "error": {
                            "message": e.message,
                            "type": e.error_type,
                            "param": e.param,
                            "code": e.code,
                        }
                    }
                )
            }
        yield {"data": "[DONE]"}

    return EventSourceResponse(frames(), sep="\n", ping=15)


def finish_reason(f: Finished | None) -> str | None:
    return None if f is None or f.reason == "cancelled" else f.reason
